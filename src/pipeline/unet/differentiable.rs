//! The UNet's differentiable path: plain candle operations that all have a backward, for inputs
//! that track gradients.
//!
//! The fused CPU kernels of [`crate::kernels`] build their outputs from raw slices, so candle's
//! autograd cannot see through them. Every layer therefore checks its input with
//! [`candle_core::Tensor::track_op`]: when it tracks gradients (an optimised text embedding, or
//! anything computed from one) the layer runs the operations here and in its own
//! `forward_differentiable`; otherwise it runs the fused kernels exactly as before. Only the
//! layers downstream of a tracked tensor take this path: in a UNet call whose text embedding is a
//! [`candle_core::Var`], everything before the first cross-attention stays fused.
//!
//! Cost: the whole forward graph is kept for the backward pass, attention probabilities included
//! (`[batch, heads, queries, keys]` f32 several times per layer).

use candle_core::{DType, Tensor, D};

/// `count` positions of `xs` along `dim` starting at `start`, `stride` apart: a `narrow` for
/// stride 1, an `index_select` otherwise (both differentiable).
pub(super) fn strided(
    xs: &Tensor,
    dim: usize,
    start: usize,
    count: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    if stride == 1 {
        return xs.narrow(dim, start, count);
    }
    let indices = (0..count)
        .map(|index| u32::try_from(start + index * stride))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| candle_core::Error::Msg("convolution index beyond u32".to_string()))?;
    xs.index_select(&Tensor::new(indices, xs.device())?, dim)
}

/// Row `index` (0..3) of `L X` where `L = [[1, 0, 0, 0], [0, 1, -1, 0], [0, 0, 0, 1]]` is the
/// left inverse of Winograd's `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`;
/// `row(i)` gives row `i` of `X` (0..4).
pub(super) fn winograd_inverse_row(
    index: usize,
    row: impl Fn(usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    match index {
        0 => row(0),
        1 => row(1)? - row(2)?,
        _ => row(3),
    }
}

/// Nearest-neighbour resize of channels-last `[batch, h, w, c]` to `[batch, target_h, target_w,
/// c]` with the fused kernel's source index `min(y * h / target_h, h - 1)` (torch's `nearest`),
/// by `index_select` (differentiable for any factor).
pub(super) fn upsample_nearest(
    xs: &Tensor,
    target_h: usize,
    target_w: usize,
) -> candle_core::Result<Tensor> {
    let (_, height, width, _) = xs.dims4()?;
    if height == 0 || width == 0 {
        candle_core::bail!("upsample: empty input");
    }
    let sources = |target: usize, size: usize| -> candle_core::Result<Tensor> {
        let indices = (0..target)
            .map(|position| u32::try_from((position * size / target).min(size - 1)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| candle_core::Error::Msg("upsample index beyond u32".to_string()))?;
        Tensor::new(indices, xs.device())
    };
    xs.index_select(&sources(target_h, height)?, 1)?
        .index_select(&sources(target_w, width)?, 2)
}

/// `softmax(q k^T * scale) v` per head with a differentiable softmax (the row maximum is
/// subtracted as a constant: the softmax does not depend on it).
///
/// `query` `[batch, queries, heads * head_dim]`, `key`/`value` `[batch, keys, heads * head_dim]`
/// -> `[batch, queries, heads * head_dim]`; scores in `score_dtype`, probabilities in f32.
pub(super) fn attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: usize,
    scale: f64,
    score_dtype: DType,
) -> candle_core::Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let keys = key.dim(1)?;
    let head_dim = inner / heads.max(1);
    let compute_dtype = query.dtype();
    // [batch, n, heads * head_dim] -> [batch, heads, n, head_dim].
    let split = |xs: &Tensor, tokens: usize| {
        xs.reshape((batch, tokens, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let query = split(query, queries)?.to_dtype(score_dtype)?;
    let key = split(key, keys)?.to_dtype(score_dtype)?;
    let value = split(value, keys)?;
    let scores = (query.matmul(&key.t()?)?.to_dtype(DType::F32)? * scale)?;
    let maximum = scores.max_keepdim(D::Minus1)?.detach();
    let exponentials = scores.broadcast_sub(&maximum)?.exp()?;
    let probabilities = exponentials.broadcast_div(&exponentials.sum_keepdim(D::Minus1)?)?;
    probabilities
        .to_dtype(compute_dtype)?
        .matmul(&value)?
        .transpose(1, 2)?
        .reshape((batch, queries, inner))
}
