//! The UNet's down, middle and up blocks, and its timestep embedding.

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Transformer2D, TransformerPlace, TransformerSpec};
use super::config::{
    DownBlockKind, DownBlockPlan, MidBlockPlan, UnetConfig, UpBlockKind, UpBlockPlan,
};
use super::layers::{Downsample, Linear, ResnetBlock, ResnetSpec, Upsample};
use crate::analysis::heatmap::UnetPlace;
use crate::hook::{AttentionHook, SharedGroupNorm};
use crate::kernels;
use crate::pipeline::PipelineResult;

/// The sinusoidal timestep features of diffusers' `Timesteps`, computed in f32 exactly as torch
/// does: `[cos, sin]` (or `[sin, cos]`) of `t * exp(-ln(10000) * i / (half - shift))`.
/// Returns `[batch, channels]` (every row the same timestep).
pub fn timestep_features(
    timestep: f64,
    channels: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    batch: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let half = channels / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let time = timestep as f32;
    let mut sin = Vec::with_capacity(half);
    let mut cos = Vec::with_capacity(half);
    for index in 0..half {
        let exponent = log_period * index as f32 / denominator;
        let angle = time * exponent.exp();
        sin.push(angle.sin());
        cos.push(angle.cos());
    }
    let mut row = Vec::with_capacity(channels);
    if flip_sin_to_cos {
        row.extend_from_slice(&cos);
        row.extend_from_slice(&sin);
    } else {
        row.extend_from_slice(&sin);
        row.extend_from_slice(&cos);
    }
    row.resize(channels, 0.0);
    let mut data = Vec::with_capacity(batch * channels);
    for _ in 0..batch {
        data.extend_from_slice(&row);
    }
    Tensor::from_vec(data, (batch, channels), device)
}

/// diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Clone, Debug)]
pub struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimeEmbedding {
    /// Loads `linear_1`, `linear_2` under `vb` (`time_embedding`).
    pub fn new(vb: VarBuilder, in_features: usize, width: usize) -> PipelineResult<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_features, width, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), width, width, true)?,
        })
    }

    /// `[batch, in_features]` -> `[batch, width]`.
    pub fn forward(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = candle_nn::ops::silu(&self.linear_1.forward(features)?)?;
        self.linear_2.forward(&hidden)
    }
}

/// What every block's forward needs besides its input.
pub struct BlockInputs<'a> {
    /// SiLU of the time embedding, `[batch, time_width]`.
    pub activated_time_embedding: &'a Tensor,
    /// Text embeddings, `[batch, seq, context_dim]`.
    pub context: &'a Tensor,
    /// Group norm sharing of this call (Style Aligned), `None` for a plain call.
    pub shared_group_norm: Option<&'a SharedGroupNorm>,
}

fn transformer_spec(
    config: &UnetConfig,
    channels: usize,
    heads: usize,
    layers: usize,
    only_cross: bool,
) -> TransformerSpec {
    TransformerSpec {
        channels,
        heads,
        context_dim: config.text_embedding_dim(),
        layers,
        groups: config.groups(),
        linear_projection: config.use_linear_projection,
        upcast_attention: config.upcast_attention,
        only_cross_attention: only_cross,
    }
}

/// `CrossAttnDownBlock2D` or `DownBlock2D`.
#[derive(Clone, Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    /// Loads `resnets.*`, `attentions.*`, `downsamplers.0` under `vb` (`down_blocks.{index}`).
    pub fn new(
        vb: VarBuilder,
        config: &UnetConfig,
        plan: &DownBlockPlan,
        index: usize,
    ) -> PipelineResult<Self> {
        let mut resnets = Vec::with_capacity(plan.layers);
        let mut attentions = Vec::new();
        for layer in 0..plan.layers {
            let in_channels = if layer == 0 {
                plan.in_channels
            } else {
                plan.out_channels
            };
            resnets.push(ResnetBlock::new(
                vb.pp("resnets").pp(layer.to_string()),
                ResnetSpec {
                    in_channels,
                    out_channels: plan.out_channels,
                    time_embedding_width: Some(config.time_embedding_width()),
                    groups: config.groups(),
                    eps: config.norm_eps,
                    output_scale_factor: config.resnet_out_scale_factor,
                },
            )?);
            if plan.kind == DownBlockKind::CrossAttn {
                let spec = transformer_spec(
                    config,
                    plan.out_channels,
                    plan.heads,
                    plan.transformer_layers,
                    plan.only_cross_attention,
                );
                let place = TransformerPlace {
                    place: UnetPlace::Down,
                    block_index: index,
                    attention_index: layer,
                };
                attentions.push(Transformer2D::new(
                    vb.pp("attentions").pp(layer.to_string()),
                    &spec,
                    place,
                )?);
            }
        }
        let downsampler = if plan.downsample {
            Some(Downsample::new(
                vb.pp("downsamplers").pp("0"),
                plan.out_channels,
                config.downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// `[batch, h, w, in]` -> output `[batch, h', w', out]`; pushes every skip state onto `skips`.
    pub fn forward(
        &self,
        xs: &Tensor,
        inputs: &BlockInputs<'_>,
        skips: &mut Vec<Tensor>,
        mut hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let mut hidden = xs.clone();
        for (layer, resnet) in self.resnets.iter().enumerate() {
            hidden = resnet.forward_shared(
                &hidden,
                Some(inputs.activated_time_embedding),
                inputs.shared_group_norm,
            )?;
            if let Some(attention) = self.attentions.get(layer) {
                hidden = attention.forward(&hidden, inputs.context, hook.as_deref_mut())?;
            }
            skips.push(hidden.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden)?;
            skips.push(hidden.clone());
        }
        Ok(hidden)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs (one pair in every SD model).
#[derive(Clone, Debug)]
pub struct MidBlock {
    first_resnet: ResnetBlock,
    attention: Transformer2D,
    second_resnet: ResnetBlock,
}

impl MidBlock {
    /// Loads `resnets.0`, `attentions.0`, `resnets.1` under `vb` (`mid_block`).
    pub fn new(vb: VarBuilder, config: &UnetConfig, plan: &MidBlockPlan) -> PipelineResult<Self> {
        let resnet_spec = ResnetSpec {
            in_channels: plan.channels,
            out_channels: plan.channels,
            time_embedding_width: Some(config.time_embedding_width()),
            groups: config.groups(),
            eps: config.norm_eps,
            output_scale_factor: config.mid_block_scale_factor,
        };
        let spec = transformer_spec(
            config,
            plan.channels,
            plan.heads,
            plan.transformer_layers,
            plan.only_cross_attention,
        );
        let place = TransformerPlace {
            place: UnetPlace::Mid,
            block_index: 0,
            attention_index: 0,
        };
        Ok(Self {
            first_resnet: ResnetBlock::new(vb.pp("resnets").pp("0"), resnet_spec)?,
            attention: Transformer2D::new(vb.pp("attentions").pp("0"), &spec, place)?,
            second_resnet: ResnetBlock::new(vb.pp("resnets").pp("1"), resnet_spec)?,
        })
    }

    /// `[batch, h, w, c]` -> same shape.
    pub fn forward(
        &self,
        xs: &Tensor,
        inputs: &BlockInputs<'_>,
        hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.first_resnet.forward_shared(
            xs,
            Some(inputs.activated_time_embedding),
            inputs.shared_group_norm,
        )?;
        let hidden = self.attention.forward(&hidden, inputs.context, hook)?;
        self.second_resnet.forward_shared(
            &hidden,
            Some(inputs.activated_time_embedding),
            inputs.shared_group_norm,
        )
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`.
#[derive(Clone, Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    /// Loads `resnets.*`, `attentions.*`, `upsamplers.0` under `vb` (`up_blocks.{index}`).
    pub fn new(
        vb: VarBuilder,
        config: &UnetConfig,
        plan: &UpBlockPlan,
        index: usize,
    ) -> PipelineResult<Self> {
        let mut resnets = Vec::with_capacity(plan.layers);
        let mut attentions = Vec::new();
        for layer in 0..plan.layers {
            let skip_channels = if layer + 1 == plan.layers {
                plan.in_channels
            } else {
                plan.out_channels
            };
            let resnet_in = if layer == 0 {
                plan.prev_output_channels
            } else {
                plan.out_channels
            };
            resnets.push(ResnetBlock::new(
                vb.pp("resnets").pp(layer.to_string()),
                ResnetSpec {
                    in_channels: resnet_in + skip_channels,
                    out_channels: plan.out_channels,
                    time_embedding_width: Some(config.time_embedding_width()),
                    groups: config.groups(),
                    eps: config.norm_eps,
                    output_scale_factor: config.resnet_out_scale_factor,
                },
            )?);
            if plan.kind == UpBlockKind::CrossAttn {
                let spec = transformer_spec(
                    config,
                    plan.out_channels,
                    plan.heads,
                    plan.transformer_layers,
                    plan.only_cross_attention,
                );
                let place = TransformerPlace {
                    place: UnetPlace::Up,
                    block_index: index,
                    attention_index: layer,
                };
                attentions.push(Transformer2D::new(
                    vb.pp("attentions").pp(layer.to_string()),
                    &spec,
                    place,
                )?);
            }
        }
        let upsampler = if plan.upsample {
            Some(Upsample::new(
                vb.pp("upsamplers").pp("0"),
                plan.out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip states this block consumes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len()
    }

    /// `xs` `[batch, h, w, prev]` and this block's skips (popped from the end of `skips`) ->
    /// `[batch, h, w, out]`, or `[batch, target_h, target_w, out]` after the upsampler when
    /// `upsample_to` is given.
    pub fn forward(
        &self,
        xs: &Tensor,
        inputs: &BlockInputs<'_>,
        skips: &mut Vec<Tensor>,
        upsample_to: Option<(usize, usize)>,
        mut hook: Option<&mut AttentionHook<'_>>,
    ) -> candle_core::Result<Tensor> {
        let mut hidden = xs.clone();
        for (layer, resnet) in self.resnets.iter().enumerate() {
            let Some(skip) = skips.pop() else {
                candle_core::bail!("UNet up block ran out of skip connections");
            };
            let joined = kernels::concat_last_dim(&hidden, &skip)?;
            hidden = resnet.forward_shared(
                &joined,
                Some(inputs.activated_time_embedding),
                inputs.shared_group_norm,
            )?;
            if let Some(attention) = self.attentions.get(layer) {
                hidden = attention.forward(&hidden, inputs.context, hook.as_deref_mut())?;
            }
        }
        if let Some(upsampler) = &self.upsampler {
            let (_, height, width, _) = hidden.dims4()?;
            let (target_h, target_w) = upsample_to.unwrap_or((2 * height, 2 * width));
            hidden = upsampler.forward(&hidden, target_h, target_w)?;
        }
        Ok(hidden)
    }
}
