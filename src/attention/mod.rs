//! The attention hook: every attention layer of the UNet hands its softmax probabilities to an
//! [`AttentionProcessor`], which may read them (store, analyse) or replace them (edit).
//!
//! With no processor the UNet skips the call entirely, so the cost is nil.

pub mod p2p;
pub mod store;

use candle_core::{Result, Tensor};

/// Which part of the UNet an attention layer sits in.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum UnetPlace {
    /// Encoder (down) blocks.
    Down,
    /// The middle block.
    Mid,
    /// Decoder (up) blocks.
    Up,
}

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

/// Called by every attention layer after its softmax.
///
/// `probs` is `[batch * heads, queries, keys]`, batch-major (all heads of batch item 0 first), f32.
/// Return `Ok(Some(t))` with a tensor of the same shape to replace the probabilities, `Ok(None)` to keep them.
pub trait AttentionProcessor {
    /// Inspect or replace one layer's attention probabilities.
    fn process_probabilities(
        &mut self,
        site: &AttentionSite,
        probs: &Tensor,
    ) -> Result<Option<Tensor>>;

    /// Whether [`AttentionProcessor::process_probabilities`] needs `site`'s probabilities. When it
    /// answers false, the layer computes its attention without materialising them (fused, in
    /// cache-sized blocks) and does not call `process_probabilities` for it. Default: true.
    fn wants_probabilities(&self, _site: &AttentionSite) -> bool {
        true
    }

    /// Inspect or replace keys and values before the scores are computed (for shared attention).
    /// `keys`/`values` are `[batch * heads, keys, head_dim]`. Default: unchanged.
    fn process_keys_values(
        &mut self,
        _site: &AttentionSite,
        _keys: &Tensor,
        _values: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// Called by the sampling loop after every denoising step (after the scheduler step), so a
    /// processor can close that step's records. Default: nothing.
    fn step_finished(&mut self, _step_index: usize) -> Result<()> {
        Ok(())
    }
}

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
}
