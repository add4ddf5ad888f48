//! Session files: the model, prompts, seed and settings of a generation as JSON, so that
//! `attend --session F` reopens it and regenerates the same image; with the editor modes' parts
//! ([`EditSession`]: the Prompt-to-Prompt edit).

use std::path::{Path, PathBuf};

use crate::ui::image_input::SessionImage;
use crate::ui::settings::{AggregationChoice, ViewSettings};
use crate::worker::{EditSpec, GenerateParams, ModelSource, Products};

/// Value of a session file's `format` field.
pub const SESSION_FORMAT: &str = "attend.session.v1";

/// A saved session.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Session {
    /// Always [`SESSION_FORMAT`].
    pub format: String,
    /// The model.
    pub model: ModelSource,
    /// How its UNet multiplied (absent in older files: the model's default, as they were made).
    #[serde(default)]
    pub products: Products,
    /// The generation parameters, with defaults resolved (size and scheduler spelled out), so the
    /// same image comes back.
    pub params: GenerateParams,
    /// How heat maps are drawn.
    #[serde(default)]
    pub view: ViewSettings,
    /// What heat maps combine.
    #[serde(default)]
    pub aggregation: AggregationChoice,
    /// The word whose heat map is shown (index into the prompt's words).
    #[serde(default)]
    pub selected_word: Option<usize>,
    /// Edit mode: the Prompt-to-Prompt edit of the image (absent in older files: no edit).
    #[serde(default)]
    pub edit: Option<EditSession>,
    /// The real image runs replay (its fitted pixels embedded, checked by hash on reopening);
    /// absent: runs start from noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<SessionImage>,
}

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

/// Why a session file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The file could not be read.
    #[error("cannot read session {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The file is not valid session JSON.
    #[error("session {path} is not valid: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The JSON error (with line and column).
        error: serde_json::Error,
    },
    /// The file is JSON but not an attend session.
    #[error("session {path} has format {found:?}, expected {SESSION_FORMAT:?}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The `format` value found.
        found: String,
    },
}

impl Session {
    /// Reads and checks a session file.
    pub fn load(path: &Path) -> Result<Self, SessionError> {
        let text = std::fs::read_to_string(path).map_err(|error| SessionError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let session: Self = serde_json::from_str(&text).map_err(|error| SessionError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        if session.format != SESSION_FORMAT {
            return Err(SessionError::Format {
                path: path.to_path_buf(),
                found: session.format,
            });
        }
        Ok(session)
    }

    /// Pretty JSON text of the session.
    pub fn to_json(&self) -> String {
        // Serialising plain structs with string keys cannot fail; fall back to an empty object anyway.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_round_trips_and_wrong_files_are_named() {
        let folder = tempfile::tempdir().unwrap();
        let session = Session {
            format: SESSION_FORMAT.to_owned(),
            model: ModelSource::Folder(PathBuf::from("/models/tiny")),
            products: Products::Bf16,
            params: GenerateParams {
                prompt: "a cat".to_owned(),
                seed: 42,
                width_px: Some(64),
                height_px: Some(64),
                scheduler: Some("ddim".to_owned()),
                ..GenerateParams::default()
            },
            view: ViewSettings::default(),
            aggregation: AggregationChoice::default(),
            selected_word: Some(1),
            edit: None,
            image: None,
        };
        let path = folder.path().join("s.json");
        std::fs::write(&path, session.to_json()).unwrap();
        assert_eq!(Session::load(&path).unwrap(), session);
        // A file written before the products were saved loads with the model's default.
        let older = folder.path().join("older.json");
        let mut json: serde_json::Value = serde_json::from_str(&session.to_json()).unwrap();
        json.as_object_mut().unwrap().remove("products").unwrap();
        std::fs::write(&older, json.to_string()).unwrap();
        assert_eq!(
            Session::load(&older).unwrap(),
            Session {
                products: Products::ModelDefault,
                ..session.clone()
            }
        );

        let other = folder.path().join("other.json");
        std::fs::write(&other, session.to_json().replace(SESSION_FORMAT, "x")).unwrap();
        let error = Session::load(&other).unwrap_err().to_string();
        assert!(error.contains("other.json"), "{error}");

        let broken = folder.path().join("broken.json");
        std::fs::write(&broken, "{").unwrap();
        assert!(matches!(
            Session::load(&broken),
            Err(SessionError::Parse { .. })
        ));
    }
}
