//! Errors of the analysis layer. Every variant names the value that is wrong.

/// A setting or input of an analysis (segmentation, alignment, aggregation) that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalysisError {
    /// A parameter is out of range or inconsistent with the data.
    #[error("invalid {name}: {reason}")]
    InvalidArgument {
        /// The parameter, as the user knows it (`--k`, `kl threshold`, `edit prompt`, ...).
        name: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

/// Result alias of the analysis layer.
pub type AnalysisResult<T> = std::result::Result<T, AnalysisError>;
