//! Errors of the pipeline layer. Every variant names the file or value that is wrong.

use std::path::PathBuf;

/// Anything that can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file or folder that must exist does not.
    #[error("{what} not found: {path}")]
    Missing {
        /// What was looked for ("model folder", "UNet weights", ...).
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file exists but cannot be read or parsed.
    #[error("cannot read {path}: {reason}")]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is missing, out of range or unsupported.
    #[error("invalid configuration in {path}: {reason}")]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A weight is missing or has the wrong shape.
    #[error("weights in {path}: {reason}")]
    BadWeights {
        /// The safetensors file (or folder) the weight was looked up in.
        path: PathBuf,
        /// Which tensor and what is wrong with it.
        reason: String,
    },
    /// A run parameter the caller gave is invalid (zero steps, size not divisible, ...).
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The parameter, as the user knows it (`--steps`, `width`, ...).
        name: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A run would need more memory than the machine has (see [`crate::pipeline::limits`]).
    #[error("{what}: {reason}")]
    TooLarge {
        /// The run, by its size ("a 4096x4096 px run").
        what: String,
        /// The estimate, its parts, the memory available and what to change.
        reason: String,
    },
    /// A run produced NaN or infinite values; it stops instead of writing a black image.
    #[error("{what} hold NaN or infinite values: {hint}")]
    NonFinite {
        /// Where they were found ("the latents after step 3 of 30", "the decoded image").
        what: String,
        /// The step after which they were found, 0-based (`None`: not in a step, e.g. the decode).
        step_index: Option<usize>,
        /// The likely cause and what to try.
        hint: String,
    },
    /// The run was cancelled through its cancel token.
    #[error("cancelled")]
    Cancelled,
    /// An analysis step (prompt alignment, segmentation) refused its input.
    #[error(transparent)]
    Analysis(#[from] crate::analysis::AnalysisError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result alias of the pipeline layer.
pub type PipelineResult<T> = std::result::Result<T, PipelineError>;
