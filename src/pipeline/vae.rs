//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE): image `[b, 3, H, W]` in [-1, 1] <->
//! latents `[b, latent_channels, H / f, W / f]` with `f = 2^(len(block_out_channels) - 1)`.
//!
//! No latent scaling happens here: callers multiply encoded latents by `scaling_factor` and divide
//! latents by it before [`AutoencoderKl::decode`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::kernels;
use crate::pipeline::unet::layers::{
    Conv2d, Downsample, GroupNorm, Linear, ResnetBlock, ResnetSpec, Upsample,
};
use crate::pipeline::{PipelineError, PipelineResult};

/// Epsilon of every group norm in the VAE (diffusers hard-codes 1e-6 there).
const VAE_NORM_EPS: f64 = 1e-6;

/// Upper bound on the score elements (`queries * keys`) of the mid-block attention held at once.
const SCORE_CHUNK_ELEMENTS: usize = 2 * 1024 * 1024;

fn default_three() -> usize {
    3
}
fn default_latent_channels() -> usize {
    4
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_one() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn default_up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}

/// The `vae/config.json` of a diffusers `AutoencoderKL`. Missing keys take diffusers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    /// Image channels in (3).
    #[serde(default = "default_three")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "default_three")]
    pub out_channels: usize,
    /// Latent channels (4).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Channels of each encoder block (reversed in the decoder).
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    /// Groups of every group norm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (0.18215 for SD 1/2).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Shift subtracted before scaling (SD3/Flux VAEs); `None` for SD 1/2.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// `quant_conv` after the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// `post_quant_conv` before the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Self-attention in the middle blocks.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Activation; only `silu`.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Encoder blocks; only `DownEncoderBlock2D`.
    #[serde(default = "default_down_types")]
    pub down_block_types: Vec<String>,
    /// Decoder blocks; only `UpDecoderBlock2D`.
    #[serde(default = "default_up_types")]
    pub up_block_types: Vec<String>,
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: &Path) -> PipelineResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                PipelineError::Missing {
                    what: "VAE config",
                    path: path.to_path_buf(),
                }
            } else {
                PipelineError::BadFile {
                    path: path.to_path_buf(),
                    reason: error.to_string(),
                }
            }
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates the JSON text of a VAE config; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> PipelineResult<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Rejects settings this VAE does not implement, naming the key.
    pub fn validate(&self, path: &Path) -> PipelineResult<()> {
        let bad = |reason: String| PipelineError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(bad("`block_out_channels` is empty".to_string()));
        }
        if self.norm_num_groups == 0 {
            return Err(bad("`norm_num_groups` is 0".to_string()));
        }
        if let Some((index, channels)) = self
            .block_out_channels
            .iter()
            .enumerate()
            .find(|(_, &channels)| channels == 0 || channels % self.norm_num_groups != 0)
        {
            return Err(bad(format!(
                "`block_out_channels[{index}]` = {channels} is not a multiple of `norm_num_groups` = {}",
                self.norm_num_groups
            )));
        }
        if self.act_fn != "silu" {
            return Err(bad(format!(
                "`act_fn` = {:?} is not supported",
                self.act_fn
            )));
        }
        if self.down_block_types.len() != blocks
            || self
                .down_block_types
                .iter()
                .any(|kind| kind != "DownEncoderBlock2D")
        {
            return Err(bad(format!(
                "`down_block_types` must be {blocks} x \"DownEncoderBlock2D\", got {:?}",
                self.down_block_types
            )));
        }
        if self.up_block_types.len() != blocks
            || self
                .up_block_types
                .iter()
                .any(|kind| kind != "UpDecoderBlock2D")
        {
            return Err(bad(format!(
                "`up_block_types` must be {blocks} x \"UpDecoderBlock2D\", got {:?}",
                self.up_block_types
            )));
        }
        if self.latent_channels == 0 || self.in_channels == 0 || self.out_channels == 0 {
            return Err(bad(
                "`in_channels`, `out_channels` and `latent_channels` must be >= 1".to_string(),
            ));
        }
        Ok(())
    }

    /// Pixels per latent pixel along each side: `2^(len(block_out_channels) - 1)` (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn in_memory_path() -> PathBuf {
        PathBuf::from("<in-memory vae config>")
    }
}

/// The single-head self-attention of the VAE's middle block (`group_norm`, `to_q`/`to_k`/`to_v`/
/// `to_out.0`, or the legacy `query`/`key`/`value`/`proj_attn` names), with a residual.
#[derive(Clone, Debug)]
struct MidAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl MidAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> PipelineResult<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        let [q, k, v, out] = names;
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, VAE_NORM_EPS)?,
            to_q: Linear::new(vb.pp(q), channels, channels, true)?,
            to_k: Linear::new(vb.pp(k), channels, channels, true)?,
            to_v: Linear::new(vb.pp(v), channels, channels, true)?,
            to_out: Linear::new(vb.pp(out), channels, channels, true)?,
            channels,
        })
    }

    /// `[b, h, w, c]` -> same shape.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, height, width, channels) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((batch, height * width, channels))?;
        let query = self.to_q.forward(&tokens)?;
        let key_t = self.to_k.forward(&tokens)?.t()?;
        let value = self.to_v.forward(&tokens)?;
        let scale = (self.channels as f32).powf(-0.5);
        let queries = height * width;
        let chunk = (SCORE_CHUNK_ELEMENTS / queries.max(1)).clamp(1, queries);
        let mut outputs = Vec::with_capacity(queries.div_ceil(chunk));
        let mut start = 0;
        while start < queries {
            let len = chunk.min(queries - start);
            let scores = query
                .narrow(1, start, len)?
                .matmul(&key_t)?
                .to_dtype(DType::F32)?;
            kernels::scaled_softmax_in_place(&scores, scale)?;
            outputs.push(scores.to_dtype(value.dtype())?.matmul(&value)?);
            start += len;
        }
        let attended = if outputs.len() == 1 {
            outputs.remove(0)
        } else {
            Tensor::cat(&outputs, 1)?
        };
        let projected = self.to_out.forward(&attended)?;
        projected.reshape((batch, height, width, channels))? + xs
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Clone, Debug)]
struct VaeMidBlock {
    first_resnet: ResnetBlock,
    attention: Option<MidAttention>,
    second_resnet: ResnetBlock,
}

impl VaeMidBlock {
    fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        with_attention: bool,
    ) -> PipelineResult<Self> {
        let spec = resnet_spec(channels, channels, groups);
        let attention = if with_attention {
            Some(MidAttention::new(
                vb.pp("attentions").pp("0"),
                channels,
                groups,
            )?)
        } else {
            None
        };
        Ok(Self {
            first_resnet: ResnetBlock::new(vb.pp("resnets").pp("0"), spec)?,
            attention,
            second_resnet: ResnetBlock::new(vb.pp("resnets").pp("1"), spec)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.first_resnet.forward(xs, None)?;
        let hidden = match &self.attention {
            Some(attention) => attention.forward(&hidden)?,
            None => hidden,
        };
        self.second_resnet.forward(&hidden, None)
    }
}

fn resnet_spec(in_channels: usize, out_channels: usize, groups: usize) -> ResnetSpec {
    ResnetSpec {
        in_channels,
        out_channels,
        time_embedding_width: None,
        groups,
        eps: VAE_NORM_EPS,
        output_scale_factor: 1.0,
    }
}

/// One encoder block (`DownEncoderBlock2D`) or decoder block (`UpDecoderBlock2D`).
#[derive(Clone, Debug)]
struct ResampleBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Downsample>,
    upsampler: Option<Upsample>,
}

impl ResampleBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut hidden = xs.clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden, None)?;
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden)?;
        }
        if let Some(upsampler) = &self.upsampler {
            let (_, height, width, _) = hidden.dims4()?;
            hidden = upsampler.forward(&hidden, 2 * height, 2 * width)?;
        }
        Ok(hidden)
    }
}

/// The VAE encoder: `conv_in`, down blocks, mid block, `conv_norm_out`, SiLU, `conv_out` (to
/// `2 * latent_channels`: mean and log-variance).
#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<ResampleBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> PipelineResult<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let conv_in = Conv2d::new(vb.pp("conv_in"), config.in_channels, channels[0], 3, 1, 1)?;
        let mut blocks = Vec::with_capacity(channels.len());
        let mut out_channels = channels[0];
        for (index, &block_channels) in channels.iter().enumerate() {
            let in_channels = out_channels;
            out_channels = block_channels;
            let block_vb = vb.pp("down_blocks").pp(index.to_string());
            let resnets = (0..config.layers_per_block)
                .map(|layer| {
                    let resnet_in = if layer == 0 {
                        in_channels
                    } else {
                        out_channels
                    };
                    ResnetBlock::new(
                        block_vb.pp("resnets").pp(layer.to_string()),
                        resnet_spec(resnet_in, out_channels, groups),
                    )
                })
                .collect::<PipelineResult<Vec<_>>>()?;
            let downsampler = if index + 1 < channels.len() {
                Some(Downsample::new(
                    block_vb.pp("downsamplers").pp("0"),
                    out_channels,
                    0,
                )?)
            } else {
                None
            };
            blocks.push(ResampleBlock {
                resnets,
                downsampler,
                upsampler: None,
            });
        }
        let last = out_channels;
        Ok(Self {
            conv_in,
            blocks,
            mid_block: VaeMidBlock::new(
                vb.pp("mid_block"),
                last,
                groups,
                config.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, last, VAE_NORM_EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * config.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, image: &Tensor) -> candle_core::Result<Tensor> {
        let mut hidden = self.conv_in.forward(image)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden)?;
        }
        let hidden = self.mid_block.forward(&hidden)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&hidden)?)
    }
}

/// The VAE decoder: `conv_in`, mid block, up blocks, `conv_norm_out`, SiLU, `conv_out`.
#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    blocks: Vec<ResampleBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, config: &VaeConfig) -> PipelineResult<Self> {
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let groups = config.norm_num_groups;
        let deepest = reversed[0];
        let conv_in = Conv2d::new(vb.pp("conv_in"), config.latent_channels, deepest, 3, 1, 1)?;
        let mid_block = VaeMidBlock::new(
            vb.pp("mid_block"),
            deepest,
            groups,
            config.mid_block_add_attention,
        )?;
        let mut blocks = Vec::with_capacity(reversed.len());
        let mut out_channels = deepest;
        for (index, &block_channels) in reversed.iter().enumerate() {
            let prev_channels = out_channels;
            out_channels = block_channels;
            let block_vb = vb.pp("up_blocks").pp(index.to_string());
            let resnets = (0..=config.layers_per_block)
                .map(|layer| {
                    let resnet_in = if layer == 0 {
                        prev_channels
                    } else {
                        out_channels
                    };
                    ResnetBlock::new(
                        block_vb.pp("resnets").pp(layer.to_string()),
                        resnet_spec(resnet_in, out_channels, groups),
                    )
                })
                .collect::<PipelineResult<Vec<_>>>()?;
            let upsampler = if index + 1 < reversed.len() {
                Some(Upsample::new(
                    block_vb.pp("upsamplers").pp("0"),
                    out_channels,
                )?)
            } else {
                None
            };
            blocks.push(ResampleBlock {
                resnets,
                downsampler: None,
                upsampler,
            });
        }
        Ok(Self {
            conv_in,
            mid_block,
            blocks,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                groups,
                out_channels,
                VAE_NORM_EPS,
            )?,
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                out_channels,
                config.out_channels,
                3,
                1,
                1,
            )?,
        })
    }

    fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.conv_in.forward(latents)?;
        let mut hidden = self.mid_block.forward(&hidden)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden)?;
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&hidden)?)
    }
}

/// A loaded `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderKl {
    /// Builds the VAE from `vb` (rooted at the VAE's state dict: `encoder.*`, `decoder.*`,
    /// `quant_conv`, `post_quant_conv`). Computation runs in `vb`'s dtype on `vb`'s device.
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> PipelineResult<Self> {
        config.validate(&VaeConfig::in_memory_path())?;
        let moments = 2 * config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), moments, moments, 1, 0, 1)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(
                vb.pp("post_quant_conv"),
                config.latent_channels,
                config.latent_channels,
                1,
                0,
                1,
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv,
            post_quant_conv,
            config: config.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent pixel along each side (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    fn check_image(&self, image: &Tensor) -> PipelineResult<()> {
        let factor = self.downscale_factor();
        match image.dims4() {
            Ok((_, channels, height, width))
                if channels == self.config.in_channels
                    && height > 0
                    && width > 0
                    && height % factor == 0
                    && width % factor == 0 =>
            {
                Ok(())
            }
            _ => Err(PipelineError::InvalidArgument {
                name: "image",
                reason: format!(
                    "expected [batch, {}, H, W] with H and W positive multiples of {factor}, got {:?}",
                    self.config.in_channels,
                    image.dims()
                ),
            }),
        }
    }

    /// `[b, 2 * latent_channels, H / f, W / f]`: the posterior's mean and log-variance.
    fn moments(&self, image: &Tensor) -> PipelineResult<Tensor> {
        self.check_image(image)?;
        let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let image = image.permute((0, 2, 3, 1))?.contiguous()?;
        let moments = self.encoder.forward(&image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        Ok(moments.permute((0, 3, 1, 2))?.contiguous()?)
    }

    /// The posterior mean of `image` (`[b, in_channels, H, W]` in [-1, 1]):
    /// `[b, latent_channels, H / f, W / f]`, unscaled, in `image`'s dtype.
    pub fn encode_mean(&self, image: &Tensor) -> PipelineResult<Tensor> {
        let moments = self.moments(image)?;
        let mean = moments.narrow(1, 0, self.config.latent_channels)?;
        Ok(mean.to_dtype(image.dtype())?)
    }

    /// A posterior sample `mean + exp(logvar / 2) * noise` (log-variance clamped to [-30, 20] as
    /// diffusers does); `noise` is standard normal, `[b, latent_channels, H / f, W / f]`.
    pub fn encode_sample(&self, image: &Tensor, noise: &Tensor) -> PipelineResult<Tensor> {
        let moments = self.moments(image)?.to_dtype(DType::F32)?;
        let latent_channels = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent_channels)?;
        if noise.dims() != mean.dims() {
            return Err(PipelineError::InvalidArgument {
                name: "noise",
                reason: format!("expected shape {:?}, got {:?}", mean.dims(), noise.dims()),
            });
        }
        let log_variance = moments
            .narrow(1, latent_channels, latent_channels)?
            .clamp(-30f32, 20f32)?;
        let std = (log_variance * 0.5)?.exp()?;
        let noise = noise.to_device(&self.device)?.to_dtype(DType::F32)?;
        let sample = (mean + std.mul(&noise)?)?;
        Ok(sample.to_dtype(image.dtype())?)
    }

    /// Decodes unscaled latents `[b, latent_channels, h, w]` to an image `[b, out_channels, h * f, w * f]`
    /// in about [-1, 1] (not clamped), in `latents`' dtype.
    pub fn decode(&self, latents: &Tensor) -> PipelineResult<Tensor> {
        match latents.dims4() {
            Ok((_, channels, height, width))
                if channels == self.config.latent_channels && height > 0 && width > 0 => {}
            _ => {
                return Err(PipelineError::InvalidArgument {
                    name: "latents",
                    reason: format!(
                        "expected [batch, {}, h, w], got {:?}",
                        self.config.latent_channels,
                        latents.dims()
                    ),
                })
            }
        }
        let output_dtype = latents.dtype();
        let latents = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let latents = latents.permute((0, 2, 3, 1))?.contiguous()?;
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(&latents)?,
            None => latents,
        };
        let image = self
            .decoder
            .forward(&latents)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        Ok(image.to_dtype(output_dtype)?)
    }
}
