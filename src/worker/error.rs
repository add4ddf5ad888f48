//! Errors of the worker layer.

use crate::analysis::export::ExportError;
use crate::analysis::AnalysisError;
use crate::pipeline::PipelineError;

/// Anything an [`crate::worker::Engine`] or the worker thread can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline failed (model loading, tokenising, sampling).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// An analysis (segmentation, alignment) refused its settings.
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
    /// A command needs a model and none is loaded.
    #[error("no model is loaded")]
    NoModel,
    /// The run was cancelled or superseded.
    #[error("cancelled")]
    Cancelled,
    /// A generation parameter is invalid.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The parameter as the user knows it ("steps", "width").
        name: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A file could not be written (the error names it).
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The data asked for does not exist (e.g. no finished run to export).
    #[error("{0}")]
    Unavailable(String),
}

impl EngineError {
    /// True for a cancelled run (either this error's own variant or the pipeline's).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            Self::Cancelled | Self::Pipeline(PipelineError::Cancelled)
        )
    }
}

/// Why a command could not be handed to the worker.
#[derive(Debug, thiserror::Error)]
pub enum SendCommandError {
    /// The command queue is full (the worker is busy); try again later.
    #[error("the worker is busy (command queue full)")]
    Busy,
    /// The worker thread is gone.
    #[error("the worker thread has stopped")]
    Stopped,
}
