//! Building blocks shared by the UNet and the VAE: convolutions, linear layers, group norm, resnets
//! and the resampling layers, loaded under diffusers' parameter names.

use candle_core::{DType, Module as _, Tensor};
use candle_nn::VarBuilder;

use crate::pipeline::PipelineResult;

/// A 2-D convolution with bias (`weight` `[out, in, k, k]`, `bias` `[out]`), square kernel.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// Loads `weight` and `bias` under `vb`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        padding: usize,
        stride: usize,
    ) -> PipelineResult<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self {
            weight,
            bias,
            padding,
            stride,
        })
    }

    /// `[batch, in, h, w]` -> `[batch, out, h', w']`.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let out = xs.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        let bias = self.bias.reshape((1, (), 1, 1))?;
        out.broadcast_add(&bias)
    }

    /// The weight as a linear layer's `[out, in]` matrix (for 1x1 convolutions).
    pub fn as_linear(&self) -> candle_core::Result<Linear> {
        let (out_channels, in_channels, _, _) = self.weight.dims4()?;
        Ok(Linear {
            weight: self.weight.reshape((out_channels, in_channels))?,
            bias: Some(self.bias.clone()),
        })
    }
}

/// A linear layer (`weight` `[out, in]`, optional `bias` `[out]`) applied to the last dimension.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (and `bias` when `with_bias`) under `vb`.
    pub fn new(vb: VarBuilder, in_features: usize, out_features: usize, with_bias: bool) -> PipelineResult<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `[..., in]` -> `[..., out]`; the leading dimensions are flattened into one matrix product.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let Some((&in_features, leading)) = dims.split_last() else {
            candle_core::bail!("linear layer applied to a scalar");
        };
        let rows: usize = leading.iter().product();
        let flat = xs.reshape((rows, in_features))?;
        let out = flat.matmul(&self.weight.t()?)?;
        let out = match &self.bias {
            Some(bias) => out.broadcast_add(bias)?,
            None => out,
        };
        let mut out_dims = leading.to_vec();
        out_dims.push(out.dim(1)?);
        out.reshape(out_dims)
    }
}

/// Group normalisation over `[batch, channels, ...]` with a per-channel affine transform, optionally
/// followed by SiLU (the pair every resnet uses).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` (`[channels]`) under `vb`.
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> PipelineResult<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `[batch, channels, ...]` -> same shape, normalised per (batch, group).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_impl(xs, false)
    }

    /// `silu(group_norm(xs))`, same shape.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_impl(xs, true)
    }

    fn forward_impl(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        if dims.len() < 2 {
            candle_core::bail!("group norm needs [batch, channels, ...], got {dims:?}");
        }
        let (batch, channels) = (dims[0], dims[1]);
        if channels % self.groups != 0 {
            candle_core::bail!("group norm: {channels} channels do not split into {} groups", self.groups);
        }
        let input_dtype = xs.dtype();
        let group_size = xs.elem_count() / (batch * self.groups);
        let grouped = xs.to_dtype(DType::F32)?.reshape((batch, self.groups, group_size))?;
        let mean = (grouped.sum_keepdim(2)? / group_size as f64)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let variance = (centered.sqr()?.sum_keepdim(2)? / group_size as f64)?;
        let normed = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        let mut affine_dims = vec![1usize; dims.len()];
        affine_dims[1] = channels;
        let weight = self.weight.to_dtype(DType::F32)?.reshape(affine_dims.clone())?;
        let bias = self.bias.to_dtype(DType::F32)?.reshape(affine_dims)?;
        let out = normed.reshape(dims)?.broadcast_mul(&weight)?.broadcast_add(&bias)?;
        let out = if silu { candle_nn::ops::silu(&out)? } else { out };
        out.to_dtype(input_dtype)
    }
}

/// Layer normalisation over the last dimension with weight and bias (`[channels]`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
}

impl LayerNorm {
    /// Loads `weight` and `bias` under `vb`.
    pub fn new(vb: VarBuilder, channels: usize, eps: f64) -> PipelineResult<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            inner: candle_nn::LayerNorm::new(weight, bias, eps),
        })
    }

    /// `[..., channels]` -> same shape.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.forward(&xs.contiguous()?)
    }
}

/// diffusers' `ResnetBlock2D` (`resnet_time_scale_shift = "default"`, SiLU): two group-norm/SiLU/conv
/// stages, an optional time-embedding projection added between them, and a 1x1 `conv_shortcut`
/// when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Shape parameters of a [`ResnetBlock`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetSpec {
    /// Channels in.
    pub in_channels: usize,
    /// Channels out.
    pub out_channels: usize,
    /// Width of the time embedding, `None` for the VAE (no `time_emb_proj`).
    pub time_embedding_width: Option<usize>,
    /// Group norm groups.
    pub groups: usize,
    /// Group norm epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    /// Loads `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2` and `conv_shortcut` under `vb`.
    pub fn new(vb: VarBuilder, spec: ResnetSpec) -> PipelineResult<Self> {
        let ResnetSpec {
            in_channels,
            out_channels,
            time_embedding_width,
            groups,
            eps,
            output_scale_factor,
        } = spec;
        let norm1 = GroupNorm::new(vb.pp("norm1"), groups, in_channels, eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?;
        let time_emb_proj = match time_embedding_width {
            Some(width) => Some(Linear::new(vb.pp("time_emb_proj"), width, out_channels, true)?),
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), groups, out_channels, eps)?;
        let conv2 = Conv2d::new(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?;
        let conv_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(vb.pp("conv_shortcut"), in_channels, out_channels, 1, 0, 1)?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor,
        })
    }

    /// `xs` `[batch, in, h, w]`, `time_embedding` `[batch, width]` (already SiLU-activated, as every
    /// resnet applies SiLU to it first) -> `[batch, out, h, w]`.
    pub fn forward(&self, xs: &Tensor, activated_time_embedding: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let hidden = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let hidden = match (&self.time_emb_proj, activated_time_embedding) {
            (Some(projection), Some(embedding)) => {
                let time = projection.forward(embedding)?.unsqueeze(2)?.unsqueeze(3)?;
                hidden.broadcast_add(&time)?
            }
            _ => hidden,
        };
        let hidden = self.conv2.forward(&self.norm2.forward_silu(&hidden)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + hidden)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution (`conv`, 3x3, stride 2). Padding 1 pads all sides;
/// padding 0 (the VAE) pads one pixel right and bottom first.
#[derive(Clone, Debug)]
pub struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    /// Loads `conv` under `vb` (`vb` is `.../downsamplers.0`).
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> PipelineResult<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, padding, 2)?,
            pad_right_bottom: padding == 0,
        })
    }

    /// `[batch, c, h, w]` -> `[batch, c, ceil(h/2), ceil(w/2)]` (padding 1).
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_right_bottom {
            let padded = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest-neighbour resize, then `conv` (3x3).
#[derive(Clone, Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// Loads `conv` under `vb` (`vb` is `.../upsamplers.0`).
    pub fn new(vb: VarBuilder, channels: usize) -> PipelineResult<Self> {
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `[batch, c, h, w]` -> `[batch, c, target_h, target_w]` (nearest, as torch's `interpolate`).
    pub fn forward(&self, xs: &Tensor, target_h: usize, target_w: usize) -> candle_core::Result<Tensor> {
        let upsampled = xs.upsample_nearest2d(target_h, target_w)?;
        self.conv.forward(&upsampled)
    }
}
