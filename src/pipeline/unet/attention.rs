//! The UNet's transformers: `Transformer2DModel` -> `BasicTransformerBlock` -> `Attention`, with the
//! attention hook called from every attention module.
//!
//! Probabilities are always formed explicitly as `softmax(Q K^T * head_dim^-0.5)` with shape
//! `[batch * heads, queries, keys]` (batch-major), so a processor sees exactly what diffusers'
//! classic `AttnProcessor` computes.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::differentiable;
use super::layers::{GroupNorm, LayerNorm, Linear};
use crate::analysis::heatmap::UnetPlace;
use crate::hook::{
    AttentionHook, AttentionKind, AttentionSite, LayerAttention, QueryKeyValue, SharedGroupNorm,
};
use crate::kernels;
use crate::pipeline::{profile, PipelineResult};

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

/// Score elements (`heads * queries * keys`) of one block of queries when no hook needs the full
/// probabilities: 512 Ki f32 = 2 MiB, so a block's scores stay in a core's cache between the
/// product, the softmax and the product with the values.
const SCORE_CHUNK_ELEMENTS: usize = 512 * 1024;

/// Upper bound on the feed-forward's widest intermediate (`tokens * 8 * dim`) held at once where
/// its layers run unfused (the fused kernel keeps only cache-sized blocks of it).
const FEED_FORWARD_CHUNK_ELEMENTS: usize = 4 * 1024 * 1024;

/// Widest self-attention (`query_dim`) whose query, key and value weights are also kept side by
/// side for one fused product (the copy costs 12 bytes per weight element: 29 MiB over SD 1.5's
/// 320 and 640 wide layers, none for its 1280 wide ones).
const FUSED_PROJECTION_MAX_WIDTH: usize = 640;

/// One diffusers `Attention` module (`to_q`, `to_k`, `to_v` without bias, `to_out.0` with bias).
#[derive(Clone, Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// `to_q`, `to_k` and `to_v` side by side, `[query_dim, 3 * inner]` (f32, contiguous), for
    /// self-attention (keys and values from the queries' own input): one product instead of three.
    /// Only for widths up to [`FUSED_PROJECTION_MAX_WIDTH`] (it is a second copy of the weights).
    qkv_weight_t: Option<Tensor>,
    /// `qkv_weight_t` packed for bf16 products (made on first use).
    qkv_packing: kernels::WeightPacking,
    heads: usize,
    head_dim: usize,
    upcast: bool,
    /// Cross-attention keys and values of the last text embedding this module saw.
    text_projection: Arc<Mutex<Option<TextProjection>>>,
}

/// `to_k` and `to_v` of one text embedding. A sampling run passes the same embedding tensor to
/// every step, so its projections are computed once per run instead of once per step (diffusers
/// recomputes them every step).
#[derive(Debug)]
struct TextProjection {
    /// The embedding's tensor id: unique for the life of the process, shared only by clones of
    /// the same (immutable) tensor.
    context: candle_core::TensorId,
    /// `[batch, keys, heads * head_dim]`.
    key: Tensor,
    /// `[batch, keys, heads * head_dim]`.
    value: Tensor,
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

impl AttentionCall {
    /// The `--profile` label of this call's attention stage `stage` (`""` for the whole core).
    fn profile_label(&self, stage: &str, keys: usize) -> String {
        let kind = match self.kind {
            AttentionKind::SelfAttention => "self",
            AttentionKind::Cross => "cross",
        };
        format!(
            "attention {kind}{stage} {}x{} queries, {keys} keys",
            self.query_h, self.query_w
        )
    }
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
        let to_q = Linear::new(vb.pp("to_q"), query_dim, inner, false)?;
        let to_k = Linear::new(vb.pp("to_k"), context_dim, inner, false)?;
        let to_v = Linear::new(vb.pp("to_v"), context_dim, inner, false)?;
        let fusable = context_dim == query_dim
            && query_dim <= FUSED_PROJECTION_MAX_WIDTH
            && [&to_q, &to_k, &to_v]
                .iter()
                .all(|linear| linear.has_plain_f32_weight());
        let qkv_weight_t = if fusable {
            Some(Tensor::cat(
                &[to_q.weight_t(), to_k.weight_t(), to_v.weight_t()],
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            to_q,
            to_k,
            to_v,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            qkv_weight_t,
            qkv_packing: kernels::WeightPacking::default(),
            heads,
            head_dim,
            upcast,
            text_projection: Arc::default(),
        })
    }

    /// `to_k(context)` and `to_v(context)`; for cross-attention, from the cache when `context`
    /// is the embedding of the previous call.
    fn keys_values(
        &self,
        context: &Tensor,
        kind: AttentionKind,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        // A tracked embedding (a `Var` the optimiser updates in place keeps its id) is never
        // cached: its projections must be recomputed, and be part of the graph, on every call.
        if kind != AttentionKind::Cross || context.track_op() {
            return Ok((self.to_k.forward(context)?, self.to_v.forward(context)?));
        }
        let mut cache = self
            .text_projection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(cached) = cache
            .as_ref()
            .filter(|cached| cached.context == context.id())
        {
            return Ok((cached.key.clone(), cached.value.clone()));
        }
        let (key, value) = (self.to_k.forward(context)?, self.to_v.forward(context)?);
        *cache = Some(TextProjection {
            context: context.id(),
            key: key.clone(),
            value: value.clone(),
        });
        Ok((key, value))
    }

    /// `[batch, n, heads * head_dim]` -> `[batch * heads, n, head_dim]` (contiguous).
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        kernels::split_heads(xs, self.heads)
    }

    /// `[batch * heads, n, head_dim]` -> `[batch, n, heads * head_dim]`.
    fn merge_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        kernels::merge_heads(xs, self.heads)
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
        if let Some(hook) = hook.as_deref() {
            hook.check_cancelled()?;
        }
        let (query, key, value) = match self.fused_projections(hidden, context, call)? {
            Some(projections) => projections,
            None => {
                let query = self.to_q.forward(hidden)?;
                let (key, value) = self.keys_values(context, call.kind)?;
                (query, key, value)
            }
        };
        if query.track_op() || key.track_op() || value.track_op() {
            if let Some(hook) = hook {
                self.refuse_processors_on_differentiable_path(&query, &key, call, hook)?;
            }
            let attended = profile::measure(
                || call.profile_label(" differentiable", key.dim(1).unwrap_or(0)),
                || self.attend_chunked(&query.detach(), &key.detach(), &value.detach()),
            )?;
            let attended = differentiable::attention_with_backward(
                &query,
                &key,
                &value,
                attended,
                self.heads,
                f64::from(self.scale()),
            )?;
            return self.to_out.forward(&attended);
        }
        let attended = match hook {
            // Measures its own stages (processors, products).
            Some(hook) => self.attend_hooked(query, key, value, call, hook)?,
            None => profile::measure(
                || call.profile_label("", key.dim(1).unwrap_or(0)),
                || self.attend_chunked(&query, &key, &value),
            )?,
        };
        self.to_out.forward(&attended)
    }

    /// Self-attention's queries, keys and values `[batch, n, inner]` from one product with the
    /// fused weight, when this layer has one, `context` is `hidden` itself and nothing tracks
    /// gradients; `None` otherwise (the three layers then run one by one).
    fn fused_projections(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        call: AttentionCall,
    ) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(weight_t) = &self.qkv_weight_t else {
            return Ok(None);
        };
        if call.kind != AttentionKind::SelfAttention
            || context.id() != hidden.id()
            || hidden.track_op()
            || hidden.dtype() != DType::F32
            || !hidden.device().is_cpu()
        {
            return Ok(None);
        }
        let (batch, tokens, width) = hidden.dims3()?;
        let rows = batch * tokens;
        let label = || {
            format!(
                "linear {width}->{} x{rows} (q, k, v)",
                weight_t.dim(1).unwrap_or(0)
            )
        };
        let groups = profile::measure(label, || {
            kernels::matmul_column_groups(
                &hidden.reshape((rows, width))?,
                weight_t,
                3,
                Some(&self.qkv_packing),
            )
        })?;
        let inner = self.heads * self.head_dim;
        let mut projections = groups
            .into_iter()
            .map(|group| group.reshape((batch, tokens, inner)));
        match (projections.next(), projections.next(), projections.next()) {
            (Some(query), Some(key), Some(value)) => Ok(Some((query?, key?, value?))),
            _ => candle_core::bail!("fused projections: expected query, key and value"),
        }
    }

    fn score_dtype(&self, compute_dtype: DType) -> DType {
        if self.upcast {
            DType::F32
        } else {
            compute_dtype
        }
    }

    fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }

    /// The hooked path (see [`crate::hook`]): the query/key/value stage when the processor wants
    /// it, then the probability stage when it wants that, else the fused kernel.
    /// `query` `[batch, queries, inner]`, `key`/`value` `[batch, keys, inner]` -> `[batch, queries, inner]`.
    fn attend_hooked(
        &self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        call: AttentionCall,
        hook: &mut AttentionHook<'_>,
    ) -> candle_core::Result<Tensor> {
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
            batch: query.dim(0)?,
            cfg: hook.cfg,
            step_index: hook.step_index,
            step_count: hook.step_count,
        };
        let mut projections = QueryKeyValue { query, key, value };
        if hook.processor.wants_queries_keys_values(&site) {
            let replaced = profile::measure(
                || call.profile_label(" projections processor", site.keys),
                || {
                    hook.processor
                        .process_queries_keys_values(&site, &projections)
                },
            )?;
            if let Some(replaced) = replaced {
                projections = self.checked_projections(&site, &projections, replaced)?;
                site.keys = projections.key.dim(1)?;
            }
        }
        if hook.processor.wants_attention_output(&site) {
            let computed = profile::measure(
                || call.profile_label(" output processor", site.keys),
                || {
                    hook.processor
                        .compute_attention_output(&site, &projections, self)
                },
            )?;
            if let Some(output) = computed {
                if output.dims() != projections.query.dims() {
                    candle_core::bail!(
                        "{}: a processor returned an attention output {:?}, expected {:?}",
                        site.module_path(),
                        output.dims(),
                        projections.query.dims()
                    );
                }
                return output.to_dtype(projections.query.dtype());
            }
        }
        let keys = site.keys;
        let compute_dtype = projections.query.dtype();
        let score_dtype = self.score_dtype(compute_dtype);
        let fused_kernel = (compute_dtype, score_dtype) == (DType::F32, DType::F32)
            && projections.query.device().is_cpu();
        if fused_kernel {
            if let Some(item) = hook.processor.replaced_item(&site) {
                return self.attend_replacing_item(projections, item, &site, call, hook);
            }
        }
        let QueryKeyValue { query, key, value } = projections;
        if !hook.processor.wants_probabilities(&site) {
            match hook.processor.observed_head_mean(&site) {
                None => {
                    return profile::measure(
                        || call.profile_label(" fused", keys),
                        || self.attend_chunked(&query, &key, &value),
                    );
                }
                Some(item) if fused_kernel => {
                    let head_mean_sum = observer_sum(hook, &site, item)?;
                    return profile::measure(
                        || call.profile_label(" fused, head mean", keys),
                        || {
                            let key_t = kernels::split_heads_transposed(&key, self.heads)?;
                            kernels::fused_attention_adding_head_mean(
                                &query,
                                &key_t,
                                &value,
                                self.heads,
                                self.scale(),
                                (item, head_mean_sum),
                            )
                        },
                    );
                }
                // Other dtypes and devices materialise the probabilities for the observer.
                Some(_) => {}
            }
        }
        if fused_kernel {
            // Blocked products on head views, spread over the cores.
            let scores = profile::measure(
                || call.profile_label(" probabilities", keys),
                || {
                    let key_t = kernels::split_heads_transposed(&key, self.heads)?;
                    kernels::attention_probabilities(&query, &key_t, self.heads, self.scale())
                },
            )?;
            let probs = profile::measure(
                || call.profile_label(" processor", keys),
                || hook.processor.process_probabilities(&site, &scores),
            )?
            .unwrap_or(scores);
            return profile::measure(
                || call.profile_label(" values", keys),
                || kernels::attend_probabilities(&probs, &value, self.heads),
            );
        }
        // A contiguous `[batch * heads, head_dim, keys]`: the GEMM would gather a transposed view
        // element by element.
        let key_t = kernels::split_heads_transposed(&key, self.heads)?.to_dtype(score_dtype)?;
        let scores = self
            .split_heads(&query)?
            .to_dtype(score_dtype)?
            .matmul(&key_t)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        kernels::scaled_softmax_in_place(&scores, self.scale())?;
        let probs = match hook.processor.process_probabilities(&site, &scores)? {
            Some(replaced) => replaced.to_dtype(DType::F32)?,
            None => scores,
        };
        let attended = probs
            .to_dtype(compute_dtype)?
            .matmul(&self.split_heads(&value)?)?;
        self.merge_heads(&attended)
    }

    /// `site`'s attention with batch item `item`'s probabilities replaced by the processor's
    /// ([`AttentionProcessor::replaced_item`]): the fused kernel for the other items, the given
    /// probabilities `[heads, queries, keys]` times the item's values for it. An observer of the
    /// item's head mean gets the replacement's. `[batch, queries, inner]` f32 projections in, the
    /// output `[batch, queries, inner]` out.
    fn attend_replacing_item(
        &self,
        projections: QueryKeyValue,
        item: usize,
        site: &AttentionSite,
        call: AttentionCall,
        hook: &mut AttentionHook<'_>,
    ) -> candle_core::Result<Tensor> {
        let QueryKeyValue { query, key, value } = projections;
        let batch = site.batch;
        if item >= batch {
            candle_core::bail!(
                "{}: the attention processor replaces item {item} of a batch of {batch}",
                site.module_path()
            );
        }
        let probabilities = profile::measure(
            || call.profile_label(" replacement processor", site.keys),
            || hook.processor.replacement_probabilities(site),
        )?;
        let expected = [site.heads, site.queries(), site.keys];
        if probabilities.dims() != expected {
            candle_core::bail!(
                "{}: the attention processor gave probabilities {:?} for item {item}, expected \
                 {expected:?}",
                site.module_path(),
                probabilities.dims()
            );
        }
        if hook.processor.observed_head_mean(site) == Some(item) {
            let mean = kernels::mean_of_planes(&probabilities)?;
            kernels::add_into(observer_sum(hook, site, item)?, &mean)?;
        }
        profile::measure(
            || call.profile_label(" fused, one item replaced", site.keys),
            || {
                let fused = |first: usize, count: usize| {
                    let key_t =
                        kernels::split_heads_transposed(&key.narrow(0, first, count)?, self.heads)?;
                    kernels::fused_attention(
                        &query.narrow(0, first, count)?,
                        &key_t,
                        &value.narrow(0, first, count)?,
                        self.heads,
                        self.scale(),
                    )
                };
                let mut parts = Vec::with_capacity(3);
                if item > 0 {
                    parts.push(fused(0, item)?);
                }
                parts.push(kernels::attend_probabilities(
                    &probabilities,
                    &value.narrow(0, item, 1)?,
                    self.heads,
                )?);
                if item + 1 < batch {
                    parts.push(fused(item + 1, batch - item - 1)?);
                }
                Tensor::cat(&parts, 0)
            },
        )
    }

    /// The differentiable path has no processor stages (a processor's kernels would cut the
    /// gradient): a processor that wants this layer's projections or probabilities is an error.
    fn refuse_processors_on_differentiable_path(
        &self,
        query: &Tensor,
        key: &Tensor,
        call: AttentionCall,
        hook: &mut AttentionHook<'_>,
    ) -> candle_core::Result<()> {
        let site = AttentionSite {
            place: call.place.place,
            block_index: call.place.block_index,
            attention_index: call.place.attention_index,
            layer_index: call.layer_index,
            kind: call.kind,
            query_h: call.query_h,
            query_w: call.query_w,
            heads: self.heads,
            keys: key.dim(1)?,
            batch: query.dim(0)?,
            cfg: hook.cfg,
            step_index: hook.step_index,
            step_count: hook.step_count,
        };
        if hook.processor.wants_queries_keys_values(&site)
            || hook.processor.wants_probabilities(&site)
            || hook.processor.observed_head_mean(&site).is_some()
            || hook.processor.replaced_item(&site).is_some()
        {
            candle_core::bail!(
                "{}: attention processors cannot run while the UNet computes gradients",
                site.module_path()
            );
        }
        Ok(())
    }

    /// A processor's replacement projections, checked against the originals (same batch, queries
    /// and channels; as many values as keys) and brought to the layer's dtype, contiguous.
    fn checked_projections(
        &self,
        site: &AttentionSite,
        original: &QueryKeyValue,
        replaced: QueryKeyValue,
    ) -> candle_core::Result<QueryKeyValue> {
        let (batch, queries, inner) = original.query.dims3()?;
        let (key_batch, keys, key_inner) = replaced.key.dims3()?;
        if replaced.query.dims() != [batch, queries, inner]
            || (key_batch, key_inner) != (batch, inner)
            || replaced.value.dims() != [batch, keys, inner]
        {
            candle_core::bail!(
                "{}: a processor returned query {:?}, key {:?}, value {:?}; expected query \
                 {:?} and keys/values [{batch}, any, {inner}]",
                site.module_path(),
                replaced.query.dims(),
                replaced.key.dims(),
                replaced.value.dims(),
                original.query.dims()
            );
        }
        let dtype = original.query.dtype();
        Ok(QueryKeyValue {
            query: replaced.query.to_dtype(dtype)?.contiguous()?,
            key: replaced.key.to_dtype(dtype)?.contiguous()?,
            value: replaced.value.to_dtype(dtype)?.contiguous()?,
        })
    }

    /// `softmax(q k^T * scale) v` in blocks of queries whose scores stay cache-sized, the blocks
    /// spread over the cores. Same shapes as [`Attention::attend_hooked`].
    fn attend_chunked(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (batch, queries, inner) = query.dims3()?;
        let keys = key.dim(1)?;
        let compute_dtype = query.dtype();
        let score_dtype = self.score_dtype(compute_dtype);
        let heads = self.heads;
        if (compute_dtype, score_dtype) == (DType::F32, DType::F32) && query.device().is_cpu() {
            let key_t = kernels::split_heads_transposed(key, heads)?;
            return kernels::fused_attention(query, &key_t, value, heads, self.scale());
        }
        // Contiguous per-head operands: [batch * heads, n, head_dim] and keys as [.., head_dim, keys].
        let query = self.split_heads(query)?.to_dtype(score_dtype)?;
        let key_t = kernels::split_heads_transposed(key, heads)?.to_dtype(score_dtype)?;
        let value = self.split_heads(value)?;
        let block = (SCORE_CHUNK_ELEMENTS / (heads * keys).max(1)).clamp(1, queries.max(1));
        let blocks_per_item = queries.div_ceil(block);
        let total_scores = batch * heads * queries * keys;
        let results = kernels::parallel_map(
            batch * blocks_per_item,
            total_scores >= SCORE_CHUNK_ELEMENTS,
            |unit| {
                let (item, block_index) = (unit / blocks_per_item, unit % blocks_per_item);
                let start = block_index * block;
                let len = block.min(queries - start);
                let rows = item * heads;
                let scores = query
                    .narrow(0, rows, heads)?
                    .narrow(1, start, len)?
                    .matmul(&key_t.narrow(0, rows, heads)?)?
                    .to_dtype(DType::F32)?;
                kernels::scaled_softmax_in_place(&scores, self.scale())?;
                scores
                    .to_dtype(compute_dtype)?
                    .matmul(&value.narrow(0, rows, heads)?)
            },
        );
        let blocks = results
            .into_iter()
            .collect::<candle_core::Result<Vec<_>>>()?;
        let items = blocks
            .chunks(blocks_per_item)
            .map(|item_blocks| Tensor::cat(item_blocks, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // [batch * heads, n, head_dim] -> [batch, n, heads * head_dim].
        let merged = self.merge_heads(&Tensor::cat(&items, 0)?)?;
        debug_assert_eq!(merged.dims(), &[batch, queries, inner]);
        Ok(merged)
    }
}

impl LayerAttention for Attention {
    fn attend(&self, projections: &QueryKeyValue) -> candle_core::Result<Tensor> {
        self.attend_chunked(&projections.query, &projections.key, &projections.value)
    }

    fn scale(&self) -> f32 {
        Attention::scale(self)
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

    /// `[batch, n, dim]` -> `[batch, n, dim]`: all tokens at once through the fused kernel, else
    /// in blocks of tokens of bounded size.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if xs.track_op() {
            // The differentiable path (see [`differentiable`]), unchunked.
            let projected = self.project_in.forward(xs)?;
            let gated = kernels::geglu(&projected.detach())?;
            let saved = projected.detach();
            let gated = differentiable::with_backward(&projected, gated, move |grad| {
                differentiable::geglu_input_gradient(&saved, grad)
            })?;
            return self.project_out.forward(&gated);
        }
        let (batch, tokens, dim) = xs.dims3()?;
        let rows = batch * tokens;
        let flat = xs.reshape((rows, dim))?;
        let fused = match (
            self.project_in.kernel_parts(),
            self.project_out.kernel_parts(),
        ) {
            (Some(project_in), Some(project_out)) if xs.dtype() == DType::F32 => {
                Some((project_in, project_out))
            }
            _ => None,
        };
        // The fused kernel bounds its own scratch: all rows in one call, so its blocks over the
        // cores pack each weight as few times as they can and no pieces are joined. SD 1.5 at
        // 512 px, three profile pairs: the feed-forward stages 1213 -> 1137 ms per call (mean).
        if let Some((project_in, project_out)) = fused {
            let out = profile::measure(
                || {
                    format!(
                        "linear {dim}->{} x{rows} + geglu + linear {}->{dim}",
                        2 * self.inner,
                        self.inner
                    )
                },
                || kernels::linear_geglu(&flat, project_in, Some(project_out)),
            )?;
            return out.reshape((batch, tokens, dim));
        }
        // Unfused: equal chunks of at most the bound (a small remainder chunk would multiply
        // poorly and read the weights once more for little work).
        let max_rows =
            (FEED_FORWARD_CHUNK_ELEMENTS / (2 * self.inner).max(1)).clamp(1, rows.max(1));
        let rows_per_chunk = rows.div_ceil(rows.div_ceil(max_rows).max(1)).max(1);
        let mut pieces = Vec::with_capacity(rows.div_ceil(rows_per_chunk));
        let mut start = 0;
        while start < rows {
            let len = rows_per_chunk.min(rows - start);
            let chunk = flat.narrow(0, start, len)?;
            let projected = self.project_in.forward(&chunk)?;
            let gated = profile::measure(
                || format!("geglu {:?}", projected.dims()),
                || kernels::geglu(&projected),
            )?;
            let out = self.project_out.forward(&gated)?;
            pieces.push(out);
            start += len;
        }
        let out = if pieces.len() == 1 {
            pieces.remove(0)
        } else {
            Tensor::cat(&pieces, 0)?
        };
        out.reshape((batch, tokens, dim))
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
        let attn1_context = if spec.only_cross_attention {
            spec.context_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(
                vb.pp("attn1"),
                dim,
                attn1_context,
                spec.heads,
                head_dim,
                spec.upcast_attention,
            )?,
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
        let self_context = if self.only_cross_attention {
            context
        } else {
            &normed
        };
        let call1 = AttentionCall {
            kind: AttentionKind::SelfAttention,
            ..call
        };
        let attended = self
            .attn1
            .forward(&normed, self_context, call1, hook.as_deref_mut())?;
        let hidden = kernels::add_to_fresh(attended, hidden)?;
        let normed = self.norm2.forward(&hidden)?;
        let call2 = AttentionCall {
            kind: AttentionKind::Cross,
            ..call
        };
        let hidden =
            kernels::add_to_fresh(self.attn2.forward(&normed, context, call2, hook)?, &hidden)?;
        let normed = self.norm3.forward(&hidden)?;
        kernels::add_to_fresh(self.ff.forward(&normed)?, &hidden)
    }
}

/// `proj_in`/`proj_out` of a transformer: a 1x1 convolution (SD 1) or a linear layer (SD 2); both
/// are applied as a linear layer on `[batch, h * w, channels]`, which is the same computation.
fn projection(vb: VarBuilder, channels: usize, linear: bool) -> PipelineResult<Linear> {
    if linear {
        Linear::new(vb, channels, channels, true)
    } else {
        Linear::from_pointwise_conv(vb, channels, channels)
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
    pub fn new(
        vb: VarBuilder,
        spec: &TransformerSpec,
        place: TransformerPlace,
    ) -> PipelineResult<Self> {
        let channels = spec.channels;
        let blocks = (0..spec.layers)
            .map(|layer| {
                TransformerBlock::new(vb.pp("transformer_blocks").pp(layer.to_string()), spec)
            })
            .collect::<PipelineResult<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), spec.groups, channels, 1e-6)?,
            proj_in: projection(vb.pp("proj_in"), channels, spec.linear_projection)?,
            blocks,
            proj_out: projection(vb.pp("proj_out"), channels, spec.linear_projection)?,
            place,
        })
    }

    /// `xs` `[batch, h, w, channels]`, `context` `[batch, seq, context_dim]` -> `[batch, h, w, channels]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        mut hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (batch, height, width, channels) = xs.dims4()?;
        let shared: Option<SharedGroupNorm> = hook
            .as_deref()
            .and_then(|hook| hook.processor.shared_group_norm(batch, hook.cfg));
        let tokens = self
            .norm
            .forward_shared(xs, shared.as_ref(), false)?
            .reshape((batch, height * width, channels))?;
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
        kernels::add_to_fresh(projected.reshape((batch, height, width, channels))?, xs)
    }
}

/// The sum the hook's observer of item `item`'s head mean keeps at `site`
/// ([`AttentionProcessor::head_mean_sum`]); an observer that names the item but gives no sum is an
/// error.
fn observer_sum<'hook>(
    hook: &'hook mut AttentionHook<'_>,
    site: &AttentionSite,
    item: usize,
) -> candle_core::Result<&'hook mut [f32]> {
    match hook.processor.head_mean_sum(site)? {
        Some(sum) => Ok(sum),
        None => candle_core::bail!(
            "{}: the attention processor observes the head mean of item {item} but gave no sum \
             to add it to",
            site.module_path()
        ),
    }
}
