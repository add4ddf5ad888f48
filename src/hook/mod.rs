//! The attention hook: every attention layer of the UNet describes itself with an [`AttentionSite`]
//! and hands its work to an [`AttentionProcessor`] in two stages:
//!
//! 1. **queries, keys and values** (`[batch, tokens, heads * head_dim]`, before the scores): a
//!    processor may replace them, e.g. to let one image attend to another's keys and values
//!    (shared attention);
//! 2. **probabilities** (`[batch * heads, queries, keys]`, after the softmax): a processor may read
//!    them (store, analyse) or replace them (Prompt-to-Prompt). A processor that only needs one
//!    batch item's mean over the heads (the attention store) asks for that instead
//!    ([`AttentionProcessor::observed_head_mean`]): the fused kernel sums it on the way. A
//!    processor that replaces one batch item's probabilities with ones it makes without reading
//!    the layer's (Prompt-to-Prompt replaying a recorded source) says so
//!    ([`AttentionProcessor::replaced_item`]): the layer then keeps its fused kernel for the
//!    other items and multiplies the given probabilities with the item's values.
//!
//! A layer asks first whether each stage is wanted: a stage no processor wants costs nothing, and a
//! layer whose probabilities nobody wants runs the fused attention kernel (the scores never exist in
//! full). With no processor at all the UNet skips the hook entirely.
//!
//! Two further, rarer entry points serve processors that change how a batch's images relate
//! (Style Aligned's shared attention):
//! - **the attention output** ([`AttentionProcessor::compute_attention_output`]): after the
//!   query/key/value stage a processor may compute a layer's whole attention output itself, with
//!   the layer's own fused kernel handed to it ([`LayerAttention`]) for whichever rows and keys it
//!   likes (e.g. some batch items with their own keys, others with more); such a layer has no
//!   probability stage;
//! - **group norm sharing** ([`AttentionProcessor::shared_group_norm`]): asked once per UNet call,
//!   it lets every group norm of the UNet (resnets, transformers' input norm, the output norm)
//!   normalise a batch item with the statistics of itself and another item together
//!   ([`SharedGroupNorm`]); `None` (the default) keeps the fused per-item kernel.
//!
//! This layer sits below the pipeline (which calls it) and the processors (which implement it); it
//! depends only on candle and the plain [`UnetPlace`] of [`crate::analysis`].

mod chain;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};

pub use chain::ChainedProcessors;

use crate::analysis::heatmap::UnetPlace;

/// Self-attention (`attn1`, keys from the latent pixels) or cross-attention (`attn2`, keys from text tokens).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum AttentionKind {
    /// `attn1`: queries and keys are latent pixels.
    SelfAttention,
    /// `attn2`: queries are latent pixels, keys are text tokens.
    Cross,
}

/// Describes one attention call, so a processor knows where in the UNet and when it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionSite {
    /// Down, mid or up.
    pub place: UnetPlace,
    /// Index of the block within its place (`down_blocks.{block_index}`); 0 for mid.
    pub block_index: usize,
    /// Index of the `Transformer2DModel` within the block (`attentions.{attention_index}`).
    pub attention_index: usize,
    /// Index of the transformer layer inside it (`transformer_blocks.{layer_index}`).
    pub layer_index: usize,
    /// Self or cross attention.
    pub kind: AttentionKind,
    /// Query grid height (latent rows at this resolution).
    pub query_h: usize,
    /// Query grid width.
    pub query_w: usize,
    /// Number of attention heads.
    pub heads: usize,
    /// Number of keys (77 text tokens for cross, `query_h * query_w` for self).
    pub keys: usize,
    /// Batch size of the UNet call (2 with classifier-free guidance: unconditional half first).
    pub batch: usize,
    /// True when the batch is `[unconditional..., conditional...]` (CFG); editing acts on the second half.
    pub cfg: bool,
    /// Denoising step index, 0-based (0 outside a sampling loop).
    pub step_index: usize,
    /// Total number of denoising steps of the run (1 outside a sampling loop).
    pub step_count: usize,
}

impl AttentionSite {
    /// The diffusers module path of this attention, e.g.
    /// `down_blocks.0.attentions.1.transformer_blocks.0.attn2`.
    pub fn module_path(&self) -> String {
        let block = match self.place {
            UnetPlace::Down => format!("down_blocks.{}", self.block_index),
            UnetPlace::Mid => "mid_block".to_string(),
            UnetPlace::Up => format!("up_blocks.{}", self.block_index),
        };
        let attn = match self.kind {
            AttentionKind::SelfAttention => "attn1",
            AttentionKind::Cross => "attn2",
        };
        format!(
            "{block}.attentions.{}.transformer_blocks.{}.{attn}",
            self.attention_index, self.layer_index
        )
    }

    /// Number of queries (`query_h * query_w`).
    pub fn queries(&self) -> usize {
        self.query_h * self.query_w
    }
}

/// One attention layer's projections, heads merged: `query` `[batch, queries, heads * head_dim]`,
/// `key` and `value` `[batch, keys, heads * head_dim]` (batch-major; with classifier-free guidance
/// the unconditional items come first). Channel `c` belongs to head `c / head_dim`.
#[derive(Clone, Debug)]
pub struct QueryKeyValue {
    /// `[batch, queries, heads * head_dim]`.
    pub query: Tensor,
    /// `[batch, keys, heads * head_dim]`.
    pub key: Tensor,
    /// `[batch, keys, heads * head_dim]`.
    pub value: Tensor,
}

/// How the UNet's group norms share statistics inside a batch (Style Aligned): batch item `i`
/// with `references[i] == Some(r)` (`r != i`) is normalised with the mean and variance of its
/// features concatenated with item `r`'s along the height (`[1, 2h, w, c]`, channels-last), and
/// keeps its own rows; items with `None` (or themselves) are normalised alone, exactly as without
/// sharing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedGroupNorm {
    /// One entry per batch item: the item whose features join its statistics.
    pub references: Vec<Option<usize>>,
}

impl SharedGroupNorm {
    /// True when some item shares its statistics with another one.
    pub fn shares_any(&self) -> bool {
        self.references
            .iter()
            .enumerate()
            .any(|(item, reference)| reference.is_some_and(|reference| reference != item))
    }
}

/// An attention layer's own attention, handed to a processor that computes the layer's output
/// ([`AttentionProcessor::compute_attention_output`]).
pub trait LayerAttention {
    /// `softmax(q k^T * head_dim^-0.5) v` per head with the layer's fused kernel (the computation
    /// an untouched layer runs): `projections` `[batch, queries, inner]` and `[batch, keys,
    /// inner]` (heads merged, any batch and key count) -> `[batch, queries, inner]`.
    fn attend(&self, projections: &QueryKeyValue) -> Result<Tensor>;

    /// The logit scale `head_dim^-0.5`.
    fn scale(&self) -> f32;
}

/// What every attention layer calls; see the module docs for the two stages. Each stage is asked
/// for first (`wants_*`), so a processor pays only for what it uses.
pub trait AttentionProcessor {
    /// Whether [`AttentionProcessor::process_queries_keys_values`] wants `site`'s projections.
    /// Default: false (the layer does not call it).
    fn wants_queries_keys_values(&self, _site: &AttentionSite) -> bool {
        false
    }

    /// Inspect or replace one layer's queries, keys and values before the scores are computed
    /// (shared attention: concatenate another image's keys and values, normalise queries and keys).
    /// The replacement may change the number of keys (the [`AttentionSite::keys`] the probability
    /// stage sees follows it) but not the batch, the queries or the channel count.
    /// Return `Ok(None)` to keep them. Default: unchanged.
    fn process_queries_keys_values(
        &mut self,
        _site: &AttentionSite,
        _projections: &QueryKeyValue,
    ) -> Result<Option<QueryKeyValue>> {
        Ok(None)
    }

    /// Whether [`AttentionProcessor::process_probabilities`] needs `site`'s probabilities. When it
    /// answers false, the layer computes its attention without materialising them (fused, in
    /// cache-sized blocks) and does not call `process_probabilities` for it. Default: true.
    fn wants_probabilities(&self, _site: &AttentionSite) -> bool {
        true
    }

    /// Inspect or replace one layer's attention probabilities, called after the softmax.
    ///
    /// `probs` is `[batch * heads, queries, keys]`, batch-major (all heads of batch item 0 first),
    /// f32. Return `Ok(Some(t))` with a tensor of the same shape to replace the probabilities,
    /// `Ok(None)` to keep them.
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> Result<Option<Tensor>>;

    /// The batch item whose probabilities the processor reads only as their mean over the heads,
    /// at a layer whose probabilities it does not otherwise want
    /// ([`AttentionProcessor::wants_probabilities`] false). The layer then keeps its fused kernel,
    /// which adds that mean, as it goes, to the sum
    /// [`AttentionProcessor::head_mean_sum`] hands it. A layer that materialises its
    /// probabilities anyway (another processor of a chain wants them, or a dtype or device the
    /// fused kernel does not take) calls [`AttentionProcessor::process_probabilities`] instead,
    /// so an observer handles both. Default: `None`.
    fn observed_head_mean(&self, _site: &AttentionSite) -> Option<usize> {
        None
    }

    /// Where the layer adds the probabilities of the item
    /// [`AttentionProcessor::observed_head_mean`] named, averaged over the heads: a sum `[queries,
    /// keys]` f32 that the processor keeps (a running sum over layers, say). Called once per layer
    /// that keeps its fused kernel for the observer, right before the kernel adds to it.
    /// Default: `None`, which the layer reports as an error when the item was named.
    fn head_mean_sum(&mut self, _site: &AttentionSite) -> Result<Option<&mut [f32]>> {
        Ok(None)
    }

    /// The batch item whose probabilities the processor replaces at `site` with ones it makes
    /// without reading the layer's own probabilities of any item
    /// ([`AttentionProcessor::replacement_probabilities`]). The layer then computes no
    /// probabilities for that item, runs its fused kernel for the others and does not call
    /// [`AttentionProcessor::process_probabilities`]; an observer of that item's head mean gets
    /// the replacement's. Asked before [`AttentionProcessor::wants_probabilities`]. Default:
    /// `None`.
    fn replaced_item(&self, _site: &AttentionSite) -> Option<usize> {
        None
    }

    /// The probabilities `[heads, queries, keys]` f32 that the item
    /// [`AttentionProcessor::replaced_item`] named uses at `site`. Called once per such layer.
    /// Default: an error (a processor that names an item must give them).
    fn replacement_probabilities(&mut self, site: &AttentionSite) -> Result<Tensor> {
        candle_core::bail!(
            "{}: the attention processor named a replaced item but gave no probabilities",
            site.module_path()
        )
    }

    /// Whether [`AttentionProcessor::compute_attention_output`] computes `site`'s output.
    /// Default: false.
    fn wants_attention_output(&self, _site: &AttentionSite) -> bool {
        false
    }

    /// Computes one layer's attention output `[batch, queries, heads * head_dim]` from its
    /// projections (after the query/key/value stage), using `layer`'s fused kernel as it likes.
    /// `Ok(None)` lets the layer go on as usual. A layer whose output a processor returned has
    /// no probability stage. Default: `None`.
    fn compute_attention_output(
        &mut self,
        _site: &AttentionSite,
        _projections: &QueryKeyValue,
        _layer: &dyn LayerAttention,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Group norm sharing for a UNet call of `batch` items (`cfg`: `[uncond..., cond...]`),
    /// asked once per call (see [`SharedGroupNorm`]). Default: `None`, every item alone.
    fn shared_group_norm(&self, _batch: usize, _cfg: bool) -> Option<SharedGroupNorm> {
        None
    }

    /// Called by the sampling loop after every denoising step (after the scheduler step), so a
    /// processor can close that step's records. Default: nothing.
    fn step_finished(&mut self, _step_index: usize) -> Result<()> {
        Ok(())
    }
}

/// A cheap, clonable flag that stops a run: the sampling loops check it before every step, and
/// every attention layer of a hooked UNet call checks it before its work, so a cancelled run stops
/// within one layer even when a single step is long.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder's run to stop at its next step or attention layer.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The error an attention layer stops a UNet call with when the hook's cancel token is tripped.
/// The sampling loops report the run as cancelled then.
#[derive(Debug, thiserror::Error)]
#[error("cancelled during a UNet call")]
pub struct CancelledInLayer;

/// What the UNet's forward pass receives to call the hook: the processor and the step it is in.
pub struct AttentionHook<'a> {
    /// The processor every attention layer calls.
    pub processor: &'a mut dyn AttentionProcessor,
    /// Denoising step index, 0-based.
    pub step_index: usize,
    /// Total number of steps in the run.
    pub step_count: usize,
    /// True when the UNet batch is a CFG batch `[uncond..., cond...]`.
    pub cfg: bool,
    /// The run's cancel token, checked by every attention layer before its work.
    pub cancel: Option<&'a CancelToken>,
}

impl AttentionHook<'_> {
    /// Fails with [`CancelledInLayer`] once the run's token is tripped.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(candle_core::Error::wrap(CancelledInLayer));
        }
        Ok(())
    }
}
