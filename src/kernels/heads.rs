//! Attention heads between the token layout `[batch, n, heads * head_dim]` and per-head layouts
//! (`[batch * heads, n, head_dim]`, or transposed for keys), as parallel copies.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};

use super::buffers::parallel_filled;
use super::operands::contiguous_slice;

/// Rearranges attention heads between `[batch, n, heads * head_dim]` and per-head layouts.
#[derive(Clone, Copy)]
enum HeadLayout {
    /// `[batch, n, heads * head_dim]` -> `[batch * heads, n, head_dim]`.
    Split,
    /// `[batch, n, heads * head_dim]` -> `[batch * heads, head_dim, n]`.
    SplitTransposed,
    /// `[batch * heads, n, head_dim]` -> `[batch, n, heads * head_dim]`.
    Merge,
}

/// The head rearrangement `layout` of `heads` heads, as a custom op.
struct Heads {
    heads: usize,
    layout: HeadLayout,
}

impl Heads {
    fn run<T: WithDType>(&self, src: &[T], dims: (usize, usize, usize)) -> (Vec<T>, Vec<usize>) {
        let heads = self.heads;
        match self.layout {
            HeadLayout::Split => {
                let (batch, tokens, inner) = dims;
                let head_dim = inner / heads;
                // Output rows are (batch, head, token); each copies one head_dim run.
                let out = parallel_filled(src.len(), batch * heads * tokens, |first, piece| {
                    for (offset, dst) in piece.chunks_exact_mut(head_dim).enumerate() {
                        let row = first + offset;
                        let (item_head, token) = (row / tokens, row % tokens);
                        let (item, head) = (item_head / heads, item_head % heads);
                        dst.copy_from_slice(
                            &src[(item * tokens + token) * inner + head * head_dim..][..head_dim],
                        );
                    }
                });
                (out, vec![batch * heads, tokens, head_dim])
            }
            HeadLayout::SplitTransposed => {
                let (batch, tokens, inner) = dims;
                let head_dim = inner / heads;
                // Output rows are (batch, head, j); each gathers one value per token.
                let out = parallel_filled(src.len(), batch * heads * head_dim, |first, piece| {
                    for (offset, dst) in piece.chunks_exact_mut(tokens).enumerate() {
                        let row = first + offset;
                        let (item_head, j) = (row / head_dim, row % head_dim);
                        let (item, head) = (item_head / heads, item_head % heads);
                        let base = item * tokens * inner + head * head_dim + j;
                        for (token, d) in dst.iter_mut().enumerate() {
                            *d = src[base + token * inner];
                        }
                    }
                });
                (out, vec![batch * heads, head_dim, tokens])
            }
            HeadLayout::Merge => {
                let (batch_heads, tokens, head_dim) = dims;
                let batch = batch_heads / heads;
                let inner = heads * head_dim;
                // Output rows are (batch, token); each gathers `heads` runs.
                let out = parallel_filled(src.len(), batch * tokens, |first, piece| {
                    for (offset, dst) in piece.chunks_exact_mut(inner).enumerate() {
                        let row = first + offset;
                        let (item, token) = (row / tokens, row % tokens);
                        for (head, dst_head) in dst.chunks_exact_mut(head_dim).enumerate() {
                            let start = ((item * heads + head) * tokens + token) * head_dim;
                            dst_head.copy_from_slice(&src[start..start + head_dim]);
                        }
                    }
                });
                (out, vec![batch, tokens, inner])
            }
        }
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "attend-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims3()?;
        let (out, shape) = match storage {
            CpuStorage::F32(_) => {
                let (v, s) = self.run(contiguous_slice::<f32>(storage, layout, "heads")?, dims);
                (CpuStorage::F32(v), s)
            }
            CpuStorage::F16(_) => {
                let (v, s) = self.run(contiguous_slice(storage, layout, "heads")?, dims);
                (CpuStorage::F16(v), s)
            }
            CpuStorage::BF16(_) => {
                let (v, s) = self.run(contiguous_slice(storage, layout, "heads")?, dims);
                (CpuStorage::BF16(v), s)
            }
            CpuStorage::F64(_) => {
                let (v, s) = self.run(contiguous_slice(storage, layout, "heads")?, dims);
                (CpuStorage::F64(v), s)
            }
            _ => candle_core::bail!("heads: unsupported dtype"),
        };
        Ok((out, Shape::from_dims(&shape)))
    }
}

/// An error unless a width of `inner` splits into `heads` equal heads.
pub(super) fn check_heads(inner: usize, heads: usize) -> Result<()> {
    if heads == 0 || !inner.is_multiple_of(heads) {
        candle_core::bail!("attention: width {inner} does not split into {heads} heads");
    }
    Ok(())
}

/// `[batch, n, heads * head_dim]` -> `[batch * heads, n, head_dim]` (contiguous).
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    check_heads(xs.dim(2)?, heads)?;
    xs.contiguous()?.apply_op1_no_bwd(&Heads {
        heads,
        layout: HeadLayout::Split,
    })
}

/// `[batch, n, heads * head_dim]` -> `[batch * heads, head_dim, n]` (contiguous; keys for `q k^T`).
pub fn split_heads_transposed(xs: &Tensor, heads: usize) -> Result<Tensor> {
    check_heads(xs.dim(2)?, heads)?;
    xs.contiguous()?.apply_op1_no_bwd(&Heads {
        heads,
        layout: HeadLayout::SplitTransposed,
    })
}

/// `[batch * heads, n, head_dim]` -> `[batch, n, heads * head_dim]` (contiguous).
pub fn merge_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    if heads == 0 || xs.dim(0)? % heads != 0 {
        candle_core::bail!(
            "attention: {} rows do not hold whole groups of {heads} heads",
            xs.dim(0)?
        );
    }
    xs.contiguous()?.apply_op1_no_bwd(&Heads {
        heads,
        layout: HeadLayout::Merge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn head_layouts_match_candle() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 5, 12), &device).unwrap();
        let expected = xs
            .reshape((2, 5, 3, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((6, 5, 4))
            .unwrap();
        let split = split_heads(&xs, 3).unwrap();
        assert_eq!(max_abs_diff(&split, &expected), 0.0);
        let transposed = split_heads_transposed(&xs, 3).unwrap();
        assert_eq!(
            max_abs_diff(&transposed, &expected.transpose(1, 2).unwrap()),
            0.0
        );
        assert_eq!(max_abs_diff(&merge_heads(&split, 3).unwrap(), &xs), 0.0);
    }
}
