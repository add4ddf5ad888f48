//! Normalisation over channels-last data: group norm (statistics in f64, optionally followed by
//! SiLU) and layer norm (two passes in f32 lanes), each with its per-channel affine step.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::buffers::parallel_filled;
use super::operands::contiguous_slice;
use super::simd::{lane_sum, silu, simd_kernel};
use super::threads::parallel_ranges;

simd_kernel!(
    /// Group norm's affine step per pixel, `y = x * scale + shift`, then SiLU when `silu_after`.
    NormalizePixels<'data> {
        dst: &'data mut [f32],
        src: &'data [f32],
        scale: &'data [f32],
        shift: &'data [f32],
        silu_after: bool,
    } => {
        let channels = scale.len();
        for (dst_pixel, src_pixel) in dst.chunks_exact_mut(channels).zip(src.chunks_exact(channels)) {
            for (((d, &v), &s), &t) in dst_pixel.iter_mut().zip(src_pixel).zip(scale).zip(shift) {
                let y = v * s + t;
                *d = if silu_after { silu(y) } else { y };
            }
        }
    }
);

simd_kernel!(
    /// Per-channel sums and sums of squares in f64 of channels-last `pixels` (`sum.len()`
    /// channels each), added pixel by pixel in order, vectorised across the channels.
    ChannelSums<'data> { pixels: &'data [f32], sum: &'data mut [f64], sum_sq: &'data mut [f64] } => {
        let channels = sum.len();
        for pixel in pixels.chunks_exact(channels) {
            for ((s, q), &v) in sum.iter_mut().zip(sum_sq.iter_mut()).zip(pixel) {
                let v = f64::from(v);
                *s += v;
                *q += v * v;
            }
        }
    }
);

/// Group norm over channels-last data with per-channel affine, optionally followed by SiLU.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    weight: Vec<f32>,
    bias: Vec<f32>,
    silu: bool,
}

impl GroupNormOp {
    fn run(&self, src: &[f32], batch: usize) -> Vec<f32> {
        let channels = self.weight.len();
        let per_group = channels / self.groups;
        let pixels = src.len() / (batch * channels);
        // Per item: the affine step's per-channel scale and shift.
        let mut affine = Vec::with_capacity(batch);
        for item in 0..batch {
            let image = &src[item * pixels * channels..(item + 1) * pixels * channels];
            // Per-channel sums in f64 over pixel ranges, merged afterwards.
            let partials = parallel_ranges(pixels, channels, |range| {
                let mut sum = vec![0f64; channels];
                let mut sum_sq = vec![0f64; channels];
                pulp::Arch::new().dispatch(ChannelSums {
                    pixels: &image[range.start * channels..range.end * channels],
                    sum: &mut sum,
                    sum_sq: &mut sum_sq,
                });
                (sum, sum_sq)
            });
            let mut scale = vec![0f32; channels];
            let mut shift = vec![0f32; channels];
            let count = (pixels * per_group) as f64;
            for group in 0..self.groups {
                let channel_range = group * per_group..(group + 1) * per_group;
                let (mut total, mut total_sq) = (0f64, 0f64);
                for (sum, sum_sq) in &partials {
                    total += sum[channel_range.clone()].iter().sum::<f64>();
                    total_sq += sum_sq[channel_range.clone()].iter().sum::<f64>();
                }
                let mean = total / count;
                let variance = (total_sq / count - mean * mean).max(0.0);
                let inv_std = 1.0 / (variance + self.eps).sqrt();
                for channel in channel_range {
                    let s = inv_std * f64::from(self.weight[channel]);
                    scale[channel] = s as f32;
                    shift[channel] = (f64::from(self.bias[channel]) - mean * s) as f32;
                }
            }
            affine.push((scale, shift));
        }
        parallel_filled(src.len(), batch * pixels, |first_pixel, piece| {
            // A piece may span items: normalise each item's part with its own statistics.
            let mut pixel = first_pixel;
            let mut rest = piece;
            while !rest.is_empty() {
                let item = pixel / pixels.max(1);
                let count = (pixels - pixel % pixels).min(rest.len() / channels);
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(count * channels);
                let (scale, shift) = &affine[item];
                let source = &src[pixel * channels..][..part.len()];
                pulp::Arch::new().dispatch(NormalizePixels {
                    dst: part,
                    src: source,
                    scale,
                    shift,
                    silu_after: self.silu,
                });
                pixel += count;
                rest = tail;
            }
        })
    }
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "attend-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let batch = dims.first().copied().unwrap_or(1);
        let src = contiguous_slice::<f32>(storage, layout, "group norm")?;
        Ok((
            CpuStorage::F32(self.run(src, batch)),
            layout.shape().clone(),
        ))
    }
}

/// Group norm of channels-last `xs` `[batch, ..., channels]` with `weight`/`bias` `[channels]`,
/// then SiLU when `silu`. Statistics in f64; computed in f32 and returned in `xs`' dtype.
pub fn group_norm(
    xs: &Tensor,
    groups: usize,
    eps: f64,
    weight: &Tensor,
    bias: &Tensor,
    silu: bool,
) -> Result<Tensor> {
    let channels = xs.dim(xs.rank() - 1)?;
    if groups == 0 || channels % groups != 0 {
        candle_core::bail!("group norm: {channels} channels do not split into {groups} groups");
    }
    let dtype = xs.dtype();
    let op = GroupNormOp {
        groups,
        eps,
        weight: weight.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        silu,
    };
    xs.to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_dtype(dtype)
}

simd_kernel!(
    /// Layer norm of each `weight.len()`-wide row of `src` into `dst`: two passes in f32 lanes
    /// (mean, then the mean squared deviation), then `(v - mean) / sqrt(var + eps) * w + b`.
    LayerNormRows<'data> {
        dst: &'data mut [f32],
        src: &'data [f32],
        weight: &'data [f32],
        bias: &'data [f32],
        eps: f32,
    } => {
        let width = weight.len();
        let inverse_width = 1.0 / width as f32;
        for (dst_row, row) in dst.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
            let mean = lane_sum::<16>(row, |v| v) * inverse_width;
            let variance = lane_sum::<16>(row, |v| (v - mean) * (v - mean)) * inverse_width;
            let inverse_std = 1.0 / (variance + eps).sqrt();
            for (((d, &v), &w), &b) in dst_row.iter_mut().zip(row).zip(weight).zip(bias) {
                *d = (v - mean) * inverse_std * w + b;
            }
        }
    }
);

/// Layer norm over rows of channels-last f32 data with per-channel affine.
struct LayerNormOp {
    eps: f32,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "attend-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = self.weight.len();
        let src = contiguous_slice::<f32>(storage, layout, "layer norm")?;
        if width == 0 || src.len() % width != 0 || self.bias.len() != width {
            candle_core::bail!(
                "layer norm: {:?} does not end in the {width} channels of the weight",
                layout.shape().dims()
            );
        }
        let rows = src.len() / width;
        let out = parallel_filled(src.len(), rows, |first, piece| {
            let source = &src[first * width..][..piece.len()];
            pulp::Arch::new().dispatch(LayerNormRows {
                dst: piece,
                src: source,
                weight: &self.weight,
                bias: &self.bias,
                eps: self.eps,
            });
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Layer norm of `xs` `[..., channels]` over its last dimension, with `weight`/`bias`
/// `[channels]` (statistics in f32, as torch computes them for f32 input); returned in `xs`' dtype.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp {
        eps: eps as f32,
        weight: weight.to_dtype(candle_core::DType::F32)?.to_vec1()?,
        bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1()?,
    };
    xs.to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_dtype(xs.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_support::max_abs_diff;
    use candle_core::{DType, Device};

    #[test]
    fn group_norm_matches_candle() {
        let device = Device::Cpu;
        // The second shape is large enough to run in pieces, some of which span two items.
        for shape in [(2, 64, 5, 7), (3, 64, 20, 21)] {
            let xs = (Tensor::randn(0f32, 1.0, shape, &device).unwrap() + 3.0).unwrap();
            let weight = Tensor::randn(0f32, 1.0, 64, &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 64, &device).unwrap();
            let reference =
                candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 64, 8, 1e-5).unwrap();
            let expected = candle_nn::Module::forward(&reference, &xs).unwrap();
            let nhwc = xs.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            let plain = group_norm(&nhwc, 8, 1e-5, &weight, &bias, false).unwrap();
            assert!(max_abs_diff(&plain.permute((0, 3, 1, 2)).unwrap(), &expected) < 1e-5);
            let activated = group_norm(&nhwc, 8, 1e-5, &weight, &bias, true).unwrap();
            let expected_silu = candle_nn::ops::silu(&expected).unwrap();
            assert!(max_abs_diff(&activated.permute((0, 3, 1, 2)).unwrap(), &expected_silu) < 1e-5);
        }
    }

    #[test]
    fn layer_norm_matches_candle() {
        let device = Device::Cpu;
        // Widths with and without a lane remainder; the large shape runs in pieces.
        for shape in [(2, 5, 40), (2, 300, 320), (1, 7, 77)] {
            let width = shape.2;
            let xs = (Tensor::randn(0f32, 2.0, shape, &device).unwrap() + 5.0).unwrap();
            let weight = Tensor::randn(0f32, 1.0, width, &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, width, &device).unwrap();
            let expected = candle_nn::ops::layer_norm(&xs, &weight, &bias, 1e-5).unwrap();
            let actual = layer_norm(&xs, &weight, &bias, 1e-5).unwrap();
            assert_eq!(actual.dims(), expected.dims());
            assert!(max_abs_diff(&actual, &expected) < 1e-4, "{shape:?}");
        }
        let wrong = Tensor::zeros((2, 3, 8), DType::F32, &device).unwrap();
        let weight = Tensor::ones(5, DType::F32, &device).unwrap();
        let error = layer_norm(&wrong, &weight, &weight, 1e-5).unwrap_err();
        assert!(error.to_string().contains("5 channels"), "{error}");
    }
}
