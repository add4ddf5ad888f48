//! Errors of the worker layer.

use crate::analysis::export::ExportError;
use crate::analysis::AnalysisError;
use crate::pipeline::PipelineError;

/// Anything an [`crate::worker::Engine`] or the worker thread can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The pipeline failed (model loading, tokenising, sampling); a run stopped by its cancel token
    /// is [`PipelineError::Cancelled`] (see [`EngineError::is_cancelled`]).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// An analysis (segmentation, alignment) refused its settings.
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
    /// A command needs a model and none is loaded.
    #[error("no model is loaded")]
    NoModel,
    /// The run saw its cancel token tripped (cancelled or superseded) and stopped.
    #[error("cancelled")]
    Cancelled,
    /// The run's observer can no longer report: nobody receives the worker's events.
    #[error(transparent)]
    Disconnected(#[from] Disconnected),
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
    /// True for a run stopped by its cancel token (the engine's own check or the pipeline's).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            Self::Cancelled | Self::Pipeline(PipelineError::Cancelled)
        )
    }
}

/// The receiver of the worker's events is gone (the editor closed its handle). The only way a
/// [`crate::worker::RunObserver`] fails: the run stops and nothing more is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the receiver of the worker's events is gone")]
pub struct Disconnected;

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
