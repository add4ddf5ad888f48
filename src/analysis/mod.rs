//! Plain-data analysis of attention: heatmaps, aggregation, segmentation, masks, export.
//! Nothing here takes or returns candle tensors in its public API.

pub mod aggregate;
pub mod alignment;
pub mod appearance;
pub mod colormap;
pub mod edit_spec;
mod error;
pub mod export;
pub mod geometry;
pub mod heatmap;
pub mod image;
pub mod png_parameters;
pub mod prompt_syntax;
pub mod scene_check;
pub mod segment;

pub use error::{AnalysisError, AnalysisResult};

/// One prompt word and the positions of its sub-word tokens in the encoded (77-token) sequence.
/// Position 0 is the start token, so the first word's tokens start at 1.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WordSpan {
    /// The word as typed (lower-cased by the tokenizer's normaliser).
    pub text: String,
    /// Indices into the token sequence (start token = 0).
    pub token_indices: Vec<usize>,
}

/// A prompt's words without a tokenizer: split at whitespace, punctuation dropped, lower-cased,
/// empty pieces skipped (for previews and the fake engine, before a real tokenizer answers).
pub fn plain_words(prompt: &str) -> impl Iterator<Item = String> + '_ {
    prompt
        .split_whitespace()
        .map(|raw| {
            raw.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect::<String>()
        })
        .filter(|text| !text.is_empty())
}
