//! The UNet's transformers: `Transformer2DModel` -> `BasicTransformerBlock` -> `Attention`, with the
//! attention hook called from every attention module.
//!
//! Probabilities are always formed explicitly as `softmax(Q K^T * head_dim^-0.5)` with shape
//! `[batch * heads, queries, keys]` (batch-major), so a processor sees exactly what diffusers'
//! classic `AttnProcessor` computes.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::layers::{GroupNorm, Linear, LayerNorm};
use crate::attention::{AttentionHook, AttentionKind, AttentionSite, UnetPlace};
use crate::pipeline::PipelineResult;

/// Where a transformer sits in the UNet: enough to build every [`AttentionSite`] inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerPlace {
    /// Down, mid or up.
    pub place: UnetPlace,
    /// `down_blocks.{block_index}` / `up_blocks.{block_index}`; 0 for mid.
    pub block_index: usize,
    /// `attentions.{attention_index}`.
    pub attention_index: usize,
}

/// Upper bound on the number of score elements (`rows * keys`) materialised at once when no hook
/// needs the full probabilities: 16 Mi f32 = 64 MiB.
const SCORE_CHUNK_ELEMENTS: usize = 16 * 1024 * 1024;

/// One diffusers `Attention` module (`to_q`, `to_k`, `to_v` without bias, `to_out.0` with bias).
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    upcast: bool,
}

/// Everything an [`Attention`] call needs to describe itself to the hook.
#[derive(Clone, Copy, Debug)]
pub struct AttentionCall {
    /// Where the transformer is.
    pub place: TransformerPlace,
    /// `transformer_blocks.{layer_index}`.
    pub layer_index: usize,
    /// `attn1` or `attn2`.
    pub kind: AttentionKind,
    /// Query grid height.
    pub query_h: usize,
    /// Query grid width.
    pub query_w: usize,
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0` under `vb`. `context_dim` is the key/value input width.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> PipelineResult<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
            head_dim,
            upcast,
        })
    }

    /// `[batch, n, heads * head_dim]` -> `[batch * heads, n, head_dim]` (contiguous).
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, tokens, _) = xs.dims3()?;
        xs.reshape((batch, tokens, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * self.heads, tokens, self.head_dim))
    }

    /// `[batch * heads, n, head_dim]` -> `[batch, n, heads * head_dim]`.
    fn merge_heads(&self, xs: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
        let (_, tokens, _) = xs.dims3()?;
        xs.reshape((batch, self.heads, tokens, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, tokens, self.heads * self.head_dim))
    }

    /// `hidden` `[batch, queries, query_dim]`, `context` `[batch, keys, context_dim]` (the hidden
    /// states themselves for self-attention) -> `[batch, queries, query_dim]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        call: AttentionCall,
        hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (batch, queries, _) = hidden.dims3()?;
        let compute_dtype = hidden.dtype();
        let score_dtype = if self.upcast { DType::F32 } else { compute_dtype };
        let scale = (self.head_dim as f64).powf(-0.5);
        let query = self.split_heads(&self.to_q.forward(hidden)?)?;
        let mut key = self.split_heads(&self.to_k.forward(context)?)?;
        let mut value = self.split_heads(&self.to_v.forward(context)?)?;

        let attended = match hook {
            Some(hook) => {
                let mut site = AttentionSite {
                    place: call.place.place,
                    block_index: call.place.block_index,
                    attention_index: call.place.attention_index,
                    layer_index: call.layer_index,
                    kind: call.kind,
                    query_h: call.query_h,
                    query_w: call.query_w,
                    heads: self.heads,
                    keys: key.dim(1)?,
                    batch,
                    cfg: hook.cfg,
                    step_index: hook.step_index,
                    step_count: hook.step_count,
                };
                if let Some((new_key, new_value)) = hook.processor.process_keys_values(&site, &key, &value)? {
                    key = new_key.to_dtype(compute_dtype)?;
                    value = new_value.to_dtype(compute_dtype)?;
                    site.keys = key.dim(1)?;
                }
                let scores = (query.to_dtype(score_dtype)?.matmul(&key.to_dtype(score_dtype)?.t()?)? * scale)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
                let probs = match hook.processor.process_probabilities(&site, &probs)? {
                    Some(replaced) => replaced.to_dtype(DType::F32)?,
                    None => probs,
                };
                probs.to_dtype(compute_dtype)?.matmul(&value)?
            }
            None => self.attend_chunked(&query, &key, &value, score_dtype, scale)?,
        };
        let merged = self.merge_heads(&attended, batch)?;
        debug_assert_eq!(merged.dim(1)?, queries);
        self.to_out.forward(&merged)
    }

    /// `softmax(q k^T * scale) v` over `[batch * heads, n, head_dim]`, in row blocks of bounded size.
    fn attend_chunked(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        score_dtype: DType,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let (rows, _, _) = query.dims3()?;
        let keys = key.dim(1)?;
        let queries = query.dim(1)?;
        let compute_dtype = query.dtype();
        let key_t = key.to_dtype(score_dtype)?.t()?;
        let per_row = queries * keys;
        let rows_per_chunk = (SCORE_CHUNK_ELEMENTS / per_row.max(1)).clamp(1, rows);
        let mut outputs = Vec::with_capacity(rows.div_ceil(rows_per_chunk));
        let mut start = 0;
        while start < rows {
            let len = rows_per_chunk.min(rows - start);
            let q = query.narrow(0, start, len)?.to_dtype(score_dtype)?;
            let scores = (q.matmul(&key_t.narrow(0, start, len)?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(compute_dtype)?;
            outputs.push(probs.matmul(&value.narrow(0, start, len)?)?);
            start += len;
        }
        if outputs.len() == 1 {
            Ok(outputs.remove(0))
        } else {
            Tensor::cat(&outputs, 0)
        }
    }
}

/// diffusers' GEGLU feed-forward: `net.0.proj` (to `2 * inner`), `hidden * gelu(gate)`, `net.2`.
#[derive(Clone, Debug)]
struct FeedForward {
    project_in: Linear,
    project_out: Linear,
    inner: usize,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> PipelineResult<Self> {
        let inner = 4 * dim;
        Ok(Self {
            project_in: Linear::new(vb.pp("net").pp("0").pp("proj"), dim, 2 * inner, true)?,
            project_out: Linear::new(vb.pp("net").pp("2"), inner, dim, true)?,
            inner,
        })
    }

    /// `[batch, n, dim]` -> `[batch, n, dim]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let projected = self.project_in.forward(xs)?;
        let last = projected.rank() - 1;
        let hidden = projected.narrow(last, 0, self.inner)?;
        let gate = projected.narrow(last, self.inner, self.inner)?;
        let gated = (hidden * gate.gelu_erf()?)?;
        self.project_out.forward(&gated)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, `attn1`, `attn2`, GEGLU feed-forward).
#[derive(Clone, Debug)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

/// Shape parameters of a [`Transformer2D`].
#[derive(Clone, Copy, Debug)]
pub struct TransformerSpec {
    /// Channels in and out (= `heads * head_dim`).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the text embeddings.
    pub context_dim: usize,
    /// Number of `transformer_blocks`.
    pub layers: usize,
    /// Group norm groups of `norm`.
    pub groups: usize,
    /// Linear `proj_in`/`proj_out` (SD 2) instead of 1x1 convolutions (SD 1).
    pub linear_projection: bool,
    /// Scores in f32.
    pub upcast_attention: bool,
    /// `attn1` attends the text.
    pub only_cross_attention: bool,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, spec: &TransformerSpec) -> PipelineResult<Self> {
        let dim = spec.channels;
        let head_dim = dim / spec.heads;
        let attn1_context = if spec.only_cross_attention { spec.context_dim } else { dim };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_context, spec.heads, head_dim, spec.upcast_attention)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                spec.context_dim,
                spec.heads,
                head_dim,
                spec.upcast_attention,
            )?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            only_cross_attention: spec.only_cross_attention,
        })
    }

    /// `hidden` `[batch, h * w, dim]`, `context` `[batch, seq, context_dim]` -> `[batch, h * w, dim]`.
    fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        call: AttentionCall,
        mut hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let normed = self.norm1.forward(hidden)?;
        let self_context = if self.only_cross_attention { context } else { &normed };
        let call1 = AttentionCall {
            kind: AttentionKind::SelfAttention,
            ..call
        };
        let hidden = (self.attn1.forward(&normed, self_context, call1, hook.as_deref_mut())? + hidden)?;
        let normed = self.norm2.forward(&hidden)?;
        let call2 = AttentionCall {
            kind: AttentionKind::Cross,
            ..call
        };
        let hidden = (self.attn2.forward(&normed, context, call2, hook)? + hidden)?;
        let normed = self.norm3.forward(&hidden)?;
        self.ff.forward(&normed)? + hidden
    }
}

/// `proj_in`/`proj_out` of a transformer: a 1x1 convolution (SD 1) or a linear layer (SD 2); both
/// are applied as a linear layer on `[batch, h * w, channels]`, which is the same computation.
fn projection(vb: VarBuilder, channels: usize, linear: bool) -> PipelineResult<Linear> {
    if linear {
        Linear::new(vb, channels, channels, true)
    } else {
        Ok(super::layers::Conv2d::new(vb, channels, channels, 1, 0, 1)?.as_linear()?)
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs: group norm, `proj_in`, transformer blocks,
/// `proj_out`, residual.
#[derive(Clone, Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
    place: TransformerPlace,
}

impl Transformer2D {
    /// Loads `norm`, `proj_in`, `transformer_blocks.*`, `proj_out` under `vb` (`.../attentions.{i}`).
    pub fn new(vb: VarBuilder, spec: &TransformerSpec, place: TransformerPlace) -> PipelineResult<Self> {
        let channels = spec.channels;
        let blocks = (0..spec.layers)
            .map(|layer| TransformerBlock::new(vb.pp("transformer_blocks").pp(layer.to_string()), spec))
            .collect::<PipelineResult<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), spec.groups, channels, 1e-6)?,
            proj_in: projection(vb.pp("proj_in"), channels, spec.linear_projection)?,
            blocks,
            proj_out: projection(vb.pp("proj_out"), channels, spec.linear_projection)?,
            place,
        })
    }

    /// `xs` `[batch, channels, h, w]`, `context` `[batch, seq, context_dim]` -> `[batch, channels, h, w]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        mut hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let tokens = normed
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        let mut hidden = self.proj_in.forward(&tokens)?;
        for (layer_index, block) in self.blocks.iter().enumerate() {
            let call = AttentionCall {
                place: self.place,
                layer_index,
                kind: AttentionKind::SelfAttention,
                query_h: height,
                query_w: width,
            };
            hidden = block.forward(&hidden, context, call, hook.as_deref_mut())?;
        }
        let projected = self.proj_out.forward(&hidden)?;
        let spatial = projected
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch, channels, height, width))?;
        spatial + xs
    }
}
