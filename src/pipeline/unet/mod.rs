//! diffusers' `UNet2DConditionModel` (SD 1.x / 2.x family) in candle, with the attention hook in every
//! attention module.
//!
//! Parameter names mirror diffusers' state dict (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`),
//! so a model folder's `unet/diffusion_pytorch_model.safetensors` loads as-is.
//!
//! How it computes (CPU device; the kernels in [`crate::kernels`] are CPU custom ops):
//! - activations are channels-last `[batch, h, w, channels]` between the entry and exit permutes, so
//!   the transformers' `[batch, h * w, channels]` tokens need no transposes;
//! - 3x3 stride-1 convolutions use Winograd F(2x2, 3x3) (2.25x fewer multiplications; the transformed
//!   filter is stored for convolutions with <= 640 output channels and computed per call for wider
//!   ones on large inputs), other convolutions im2col + one matrix product, in bounded chunks;
//! - without a hook, attention runs in blocks of queries whose scores stay cache-sized, spread over
//!   the cores; with a hook, each module forms the full `[batch * heads, queries, keys]`
//!   probabilities the processor sees (1 GiB for a 64x64 latent's self-attention at batch 2).
//!
//! - when a layer's input tracks gradients (e.g. a text embedding that is a `candle_core::Var`),
//!   that layer still computes with the fused kernels (same numbers) but joins candle's graph
//!   with a backward of its own, so gradients reach the embedding (see `differentiable`);
//!   otherwise nothing changes.
//!
//! Module map: [`config`] (the config and its resolved block plans), [`layers`] (convolution,
//! linear, norms, resnet, resampling), [`attention`] (transformers and the hooked attention),
//! [`blocks`] (down/mid/up blocks, timestep embedding), `differentiable` (the operations of the
//! differentiable path).

pub mod attention;
pub mod blocks;
pub mod config;
mod differentiable;
pub mod layers;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::hook::AttentionHook;
use crate::kernels::{with_product_precision, ProductPrecision};
use crate::pipeline::{PipelineError, PipelineResult};
use blocks::{timestep_features, BlockInputs, DownBlock, MidBlock, TimeEmbedding, UpBlock};
pub use config::UnetConfig;
use layers::{Conv2d, GroupNorm};

/// A loaded `UNet2DConditionModel`.
#[derive(Clone, Debug)]
pub struct Unet {
    conv_in: Conv2d,
    time_embedding: TimeEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UnetConfig,
    dtype: DType,
    device: Device,
    /// How the kernels' matrix products treat their operands during `forward`.
    products: ProductPrecision,
}

impl Unet {
    /// Builds the UNet from `vb` (rooted at the UNet's state dict) for a validated `config`.
    /// Computation runs in `vb`'s dtype on `vb`'s device.
    pub fn new(vb: VarBuilder, config: &UnetConfig) -> PipelineResult<Self> {
        config.validate(&UnetConfig::in_memory_path())?;
        let first_channels = config.block_out_channels[0];
        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            config.in_channels,
            first_channels,
            config.conv_in_kernel,
            config.conv_in_kernel / 2,
            1,
        )?;
        let time_embedding = TimeEmbedding::new(
            vb.pp("time_embedding"),
            first_channels,
            config.time_embedding_width(),
        )?;
        let down_blocks = config
            .down_blocks()
            .iter()
            .enumerate()
            .map(|(index, plan)| {
                DownBlock::new(
                    vb.pp("down_blocks").pp(index.to_string()),
                    config,
                    plan,
                    index,
                )
            })
            .collect::<PipelineResult<Vec<_>>>()?;
        let mid_block = match config.mid_block() {
            Some(plan) => Some(MidBlock::new(vb.pp("mid_block"), config, &plan)?),
            None => None,
        };
        let up_blocks = config
            .up_blocks()
            .iter()
            .enumerate()
            .map(|(index, plan)| {
                UpBlock::new(
                    vb.pp("up_blocks").pp(index.to_string()),
                    config,
                    plan,
                    index,
                )
            })
            .collect::<PipelineResult<Vec<_>>>()?;
        let conv_norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            config.groups(),
            first_channels,
            config.norm_eps,
        )?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            first_channels,
            config.out_channels,
            config.conv_out_kernel,
            config.conv_out_kernel / 2,
            1,
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            products: ProductPrecision::F32,
        })
    }

    /// How the matrix products of [`forward`](Self::forward) treat their operands (f32 unless set).
    pub fn product_precision(&self) -> ProductPrecision {
        self.products
    }

    /// Sets how the matrix products of [`forward`](Self::forward) treat their operands: f32 (the
    /// reference), or bf16 operands with f32 sums where the CPU has AVX-512 BF16.
    pub fn set_product_precision(&mut self, precision: ProductPrecision) {
        self.products = precision;
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One denoising call.
    ///
    /// - `sample`: noisy latents `[batch, in_channels, h, w]` (any `h`, `w` >= 1).
    /// - `timestep`: the scheduler's timestep (may be fractional).
    /// - `encoder_hidden_states`: text embeddings `[batch, seq, cross_attention_dim]`.
    /// - `hook`: called by every attention module; `None` costs nothing.
    ///
    /// Returns the model output (noise or velocity) `[batch, out_channels, h, w]` in `sample`'s dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        hook: Option<&mut AttentionHook<'_>>,
    ) -> PipelineResult<Tensor> {
        with_product_precision(self.products, || {
            self.forward_at_precision(sample, timestep, encoder_hidden_states, hook)
        })
    }

    /// [`forward`](Self::forward) at the calling thread's product precision.
    fn forward_at_precision(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        mut hook: Option<&mut AttentionHook<'_>>,
    ) -> PipelineResult<Tensor> {
        let (batch, channels, height, width) =
            sample.dims4().map_err(|_| PipelineError::InvalidArgument {
                name: "sample",
                reason: format!("expected [batch, channels, h, w], got {:?}", sample.dims()),
            })?;
        if channels != self.config.in_channels || height == 0 || width == 0 {
            return Err(PipelineError::InvalidArgument {
                name: "sample",
                reason: format!(
                    "expected [batch, {}, h, w] with h, w >= 1, got {:?}",
                    self.config.in_channels,
                    sample.dims()
                ),
            });
        }
        let text_dim = self.config.text_embedding_dim();
        match encoder_hidden_states.dims3() {
            Ok((text_batch, _, dim)) if text_batch == batch && dim == text_dim => {}
            _ => {
                return Err(PipelineError::InvalidArgument {
                    name: "encoder_hidden_states",
                    reason: format!(
                        "expected [{batch}, seq, {text_dim}], got {:?}",
                        encoder_hidden_states.dims()
                    ),
                })
            }
        }
        if !timestep.is_finite() {
            return Err(PipelineError::InvalidArgument {
                name: "timestep",
                reason: format!("must be finite, got {timestep}"),
            });
        }
        let output_dtype = sample.dtype();
        let sample = sample.to_device(&self.device)?.to_dtype(self.dtype)?;
        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample
        };
        let context = encoder_hidden_states
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;

        let features = timestep_features(
            timestep,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            batch,
            &self.device,
        )?
        .to_dtype(self.dtype)?;
        let time_embedding = self.time_embedding.forward(&features)?;
        let activated_time_embedding = candle_nn::ops::silu(&time_embedding)?;
        // Asked once per call; `None` (every plain run) keeps the fused group norms.
        let shared_group_norm = hook
            .as_deref()
            .and_then(|hook| hook.processor.shared_group_norm(batch, hook.cfg));
        let inputs = BlockInputs {
            activated_time_embedding: &activated_time_embedding,
            context: &context,
            shared_group_norm: shared_group_norm.as_ref(),
        };

        // Channels-last inside: [batch, h, w, channels].
        let sample = sample.permute((0, 2, 3, 1))?.contiguous()?;
        let mut hidden = self.conv_in.forward(&sample)?;
        let mut skips = vec![hidden.clone()];
        for block in &self.down_blocks {
            hidden = block.forward(&hidden, &inputs, &mut skips, hook.as_deref_mut())?;
        }
        if let Some(mid) = &self.mid_block {
            hidden = mid.forward(&hidden, &inputs, hook.as_deref_mut())?;
        }
        for block in &self.up_blocks {
            // Upsample to the size of the next block's first skip, as diffusers' `upsample_size`.
            let remaining = skips.len().saturating_sub(block.skip_count());
            let upsample_to = match remaining.checked_sub(1).and_then(|index| skips.get(index)) {
                Some(next_skip) => {
                    let (_, next_h, next_w, _) = next_skip.dims4()?;
                    Some((next_h, next_w))
                }
                None => None,
            };
            hidden = block.forward(
                &hidden,
                &inputs,
                &mut skips,
                upsample_to,
                hook.as_deref_mut(),
            )?;
        }
        let hidden =
            self.conv_norm_out
                .forward_shared(&hidden, shared_group_norm.as_ref(), true)?;
        let out = self
            .conv_out
            .forward(&hidden)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(out.to_dtype(output_dtype)?)
    }
}
