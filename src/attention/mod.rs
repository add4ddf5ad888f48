//! Attention processors: the [`crate::hook::AttentionProcessor`]s attend runs inside the UNet, above
//! the pipeline that calls them.
//!
//! - [`store`]: keeps every step's cross-attention (per word) and self-attention for the heat maps,
//!   the probe, segmentation and export;
//! - [`p2p`]: Prompt-to-Prompt (word swap, refine, reweight, local blend, windows) and the edit
//!   sampling loops that drive it;
//! - [`prompt_weights`]: the prompt syntax's word weights as cross-attention scales.
//! - [`style_aligned`]: Style Aligned's shared attention (a set of images sharing the first one's
//!   style) and [`style_sampling`], the set's batch sampling.
//! - [`cross_image`]: cross-image attention (an output attends another image's keys and values)
//!   and [`appearance_sampling`], the appearance transfer run built on it.

pub mod appearance_sampling;
pub mod cross_image;
pub mod edit_sampling;
pub mod p2p;
pub mod prompt_weights;
pub mod store;
pub mod style_aligned;
pub mod style_sampling;

/// The batch items `items` of `xs` (`[batch, ...]`), in that order: `[items.len(), ...]`.
pub(crate) fn batch_rows(
    xs: &candle_core::Tensor,
    items: &[usize],
) -> candle_core::Result<candle_core::Tensor> {
    let rows = items
        .iter()
        .map(|&item| xs.narrow(0, item, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    candle_core::Tensor::cat(&rows, 0)
}
