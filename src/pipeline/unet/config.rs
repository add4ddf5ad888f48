//! `UnetConfig`: the diffusers `unet/config.json` of a `UNet2DConditionModel`, with diffusers' defaults.
//!
//! Deserialisation keeps the file's values as written; [`UnetConfig::validate`] then rejects every
//! setting this UNet does not implement, naming the key, and the `*_per_block` helpers resolve the
//! "int or per-block list" keys.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pipeline::{PipelineError, PipelineResult};

/// A config value that diffusers accepts either as one value for every block or as a per-block list.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    Same(T),
    /// One value per down block (in down-block order).
    List(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// Expands to one value per block; `None` when a list has the wrong length.
    pub fn resolve(&self, blocks: usize) -> Option<Vec<T>> {
        match self {
            Self::Same(value) => Some(vec![value.clone(); blocks]),
            Self::List(values) if values.len() == blocks => Some(values.clone()),
            Self::List(_) => None,
        }
    }
}

/// A down block type of `UNet2DConditionModel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownBlockKind {
    /// `CrossAttnDownBlock2D`: resnets interleaved with transformers.
    CrossAttn,
    /// `DownBlock2D`: resnets only.
    Plain,
}

/// An up block type of `UNet2DConditionModel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpBlockKind {
    /// `CrossAttnUpBlock2D`: resnets interleaved with transformers.
    CrossAttn,
    /// `UpBlock2D`: resnets only.
    Plain,
}

fn default_in_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_block_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up_block_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}
fn default_only_cross_attention() -> PerBlock<bool> {
    PerBlock::Same(false)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::Same(2)
}
fn default_one() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::Same(1280)
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::Same(1)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::Same(8)
}
fn default_resnet_time_scale_shift() -> String {
    "default".to_string()
}
fn default_time_embedding_type() -> String {
    "positional".to_string()
}
fn default_kernel() -> usize {
    3
}
fn default_attention_type() -> String {
    "default".to_string()
}

/// The `unet/config.json` of a diffusers `UNet2DConditionModel`. Missing keys take diffusers' defaults.
///
/// Keys this implementation does not support are kept so that [`UnetConfig::validate`] can name them.
#[derive(Clone, Debug, Deserialize)]
pub struct UnetConfig {
    /// Latent side the model was trained at (64 for SD 1.5, 96 for SD 2.1; an int or `[h, w]`); informational.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    /// Latent channels in (4).
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// Channels out (4: noise or velocity prediction).
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    /// `sample = 2 * sample - 1` before `conv_in`.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Sinusoidal timestep embedding as `[cos, sin]` instead of `[sin, cos]`.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down blocks, `CrossAttnDownBlock2D` or `DownBlock2D`.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// Middle block: `UNetMidBlock2DCrossAttn`, or `null` for none.
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// Up blocks, `CrossAttnUpBlock2D` or `UpBlock2D`.
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// `attn1` attends the text instead of the pixels (bool or per down block).
    #[serde(default = "default_only_cross_attention")]
    pub only_cross_attention: PerBlock<bool>,
    /// Output channels of each down block (reversed for the up blocks).
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (int or per block); up blocks have one more.
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions (1, or 0 = pad right/bottom by one).
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    /// Output scale factor of the middle block's resnets.
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    /// Dropout (inference ignores it).
    #[serde(default)]
    pub dropout: f64,
    /// Activation of resnets and time embedding; only `silu`.
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Groups of every group norm.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnets' group norms and of `conv_norm_out`.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of the text embeddings the cross-attention keys come from.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer layers per `Transformer2DModel` (int or per down block).
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Explicit per-up-block transformer layers (only as `null`).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Diffusers' naming quirk: the number of attention **heads** when `num_attention_heads` is null.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Number of attention heads; when null, `attention_head_dim` is used as the head count.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Two text encoders' cross-attention (unsupported).
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Linear `proj_in`/`proj_out` in the transformers (SD 2) instead of 1x1 convolutions (SD 1).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Attention scores in f32 even when computing in f16 (SD 2).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Class embedding (unsupported unless null).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Added embedding (SDXL `text_time`; unsupported unless null).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Class embedding count (unsupported unless null).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Time conditioning of the resnets; only `default`.
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// Activation before the resnets' time projection is skipped (unsupported unless false).
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Output scale factor of the down and up blocks' resnets.
    #[serde(default = "default_one_f64")]
    pub resnet_out_scale_factor: f64,
    /// Timestep embedding type; only `positional`.
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    /// Width of the time embedding; null = `4 * block_out_channels[0]`.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Extra activation on the time embedding (unsupported unless null).
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation after the time embedding (unsupported unless null).
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Guidance-embedding projection of LCM models (unsupported unless null).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in`.
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    /// Projection of class embeddings (unsupported unless null).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Transformer attention type; only `default`.
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    /// Concatenate class embeddings (unsupported unless false).
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// `only_cross_attention` of the middle block; null = follow a boolean `only_cross_attention`.
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Normalisation of the cross-attention keys (unsupported unless null).
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Projection of the encoder hidden states (unsupported unless null).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Type of `encoder_hid_dim` projection (unsupported unless null).
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
}

/// Everything about one down block that the constructor needs, resolved from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct DownBlockPlan {
    /// Cross-attention or plain.
    pub kind: DownBlockKind,
    /// Channels entering the block.
    pub in_channels: usize,
    /// Channels of the block's resnets and output.
    pub out_channels: usize,
    /// Number of resnets (and transformers, if any).
    pub layers: usize,
    /// Transformer layers per transformer.
    pub transformer_layers: usize,
    /// Attention heads of the transformers.
    pub heads: usize,
    /// `attn1` attends the text.
    pub only_cross_attention: bool,
    /// Ends with a stride-2 convolution (all but the last block).
    pub downsample: bool,
}

/// Everything about one up block that the constructor needs, resolved from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct UpBlockPlan {
    /// Cross-attention or plain.
    pub kind: UpBlockKind,
    /// Channels coming from the previous up block (or the middle block).
    pub prev_output_channels: usize,
    /// Channels of the down block one level deeper (the last skip's channels).
    pub in_channels: usize,
    /// Channels of the block's resnets and output.
    pub out_channels: usize,
    /// Number of resnets (down block layers + 1).
    pub layers: usize,
    /// Transformer layers per transformer.
    pub transformer_layers: usize,
    /// Attention heads of the transformers.
    pub heads: usize,
    /// `attn1` attends the text.
    pub only_cross_attention: bool,
    /// Ends with nearest upsampling + convolution (all but the last block).
    pub upsample: bool,
}

/// The middle block, resolved from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct MidBlockPlan {
    /// Channels (the last `block_out_channels`).
    pub channels: usize,
    /// Transformer layers of its transformer.
    pub transformer_layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// `attn1` attends the text.
    pub only_cross_attention: bool,
}

impl UnetConfig {
    /// Reads and validates `unet/config.json`.
    pub fn from_file(path: &Path) -> PipelineResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                PipelineError::Missing {
                    what: "UNet config",
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

    /// Parses and validates the JSON text of a UNet config; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> PipelineResult<Self> {
        let config: Self = serde_json::from_str(text).map_err(|error| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Rejects settings this UNet does not implement, naming the key; `path` goes into the error.
    pub fn validate(&self, path: &Path) -> PipelineResult<()> {
        let bad = |reason: String| PipelineError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let unsupported = |key: &str, value: String| {
            bad(format!(
                "`{key}` = {value} is not supported by attend's UNet"
            ))
        };
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(bad("`block_out_channels` is empty".to_string()));
        }
        if self.down_block_types.len() != blocks {
            return Err(bad(format!(
                "`down_block_types` has {} entries but `block_out_channels` has {blocks}",
                self.down_block_types.len()
            )));
        }
        if self.up_block_types.len() != blocks {
            return Err(bad(format!(
                "`up_block_types` has {} entries but `block_out_channels` has {blocks}",
                self.up_block_types.len()
            )));
        }
        for kind in &self.down_block_types {
            down_block_kind(kind)
                .ok_or_else(|| unsupported("down_block_types", format!("{kind:?}")))?;
        }
        for kind in &self.up_block_types {
            up_block_kind(kind)
                .ok_or_else(|| unsupported("up_block_types", format!("{kind:?}")))?;
        }
        if let Some(kind) = &self.mid_block_type {
            if kind != "UNetMidBlock2DCrossAttn" {
                return Err(unsupported("mid_block_type", format!("{kind:?}")));
            }
        }
        let Some(groups) = self.norm_num_groups else {
            return Err(unsupported("norm_num_groups", "null".to_string()));
        };
        if groups == 0 {
            return Err(bad("`norm_num_groups` is 0".to_string()));
        }
        for (index, &channels) in self.block_out_channels.iter().enumerate() {
            if channels == 0 || channels % groups != 0 {
                return Err(bad(format!(
                    "`block_out_channels[{index}]` = {channels} is not a multiple of `norm_num_groups` = {groups}"
                )));
            }
        }
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", format!("{:?}", self.act_fn)));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                format!("{:?}", self.resnet_time_scale_shift),
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                format!("{:?}", self.time_embedding_type),
            ));
        }
        if self.attention_type != "default" {
            return Err(unsupported(
                "attention_type",
                format!("{:?}", self.attention_type),
            ));
        }
        let null_only: [(&str, Option<String>); 10] = [
            ("class_embed_type", self.class_embed_type.clone()),
            ("addition_embed_type", self.addition_embed_type.clone()),
            (
                "num_class_embeds",
                self.num_class_embeds.map(|v| v.to_string()),
            ),
            ("time_embedding_act_fn", self.time_embedding_act_fn.clone()),
            ("timestep_post_act", self.timestep_post_act.clone()),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.map(|v| v.to_string()),
            ),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim
                    .map(|v| v.to_string()),
            ),
            ("cross_attention_norm", self.cross_attention_norm.clone()),
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.map(|v| v.to_string()),
            ),
            ("encoder_hid_dim_type", self.encoder_hid_dim_type.clone()),
        ];
        for (key, value) in null_only {
            if let Some(value) = value {
                return Err(unsupported(key, value));
            }
        }
        if let Some(value) = &self.reverse_transformer_layers_per_block {
            if !value.is_null() {
                return Err(unsupported(
                    "reverse_transformer_layers_per_block",
                    value.to_string(),
                ));
            }
        }
        let true_unsupported = [
            ("dual_cross_attention", self.dual_cross_attention),
            ("resnet_skip_time_act", self.resnet_skip_time_act),
            ("class_embeddings_concat", self.class_embeddings_concat),
        ];
        for (key, value) in true_unsupported {
            if value {
                return Err(unsupported(key, "true".to_string()));
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) {
            return Err(unsupported(
                "conv_in_kernel",
                self.conv_in_kernel.to_string(),
            ));
        }
        if self.conv_out_kernel.is_multiple_of(2) {
            return Err(unsupported(
                "conv_out_kernel",
                self.conv_out_kernel.to_string(),
            ));
        }
        if self.downsample_padding > 1 {
            return Err(unsupported(
                "downsample_padding",
                self.downsample_padding.to_string(),
            ));
        }
        if let PerBlock::List(_) = self.cross_attention_dim {
            return Err(unsupported(
                "cross_attention_dim",
                "a per-block list".to_string(),
            ));
        }
        let per_block_checks: [(&str, bool); 5] = [
            (
                "layers_per_block",
                self.layers_per_block.resolve(blocks).is_none(),
            ),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.resolve(blocks).is_none(),
            ),
            (
                "attention_head_dim",
                self.attention_head_dim.resolve(blocks).is_none(),
            ),
            (
                "num_attention_heads",
                self.num_attention_heads
                    .as_ref()
                    .is_some_and(|heads| heads.resolve(blocks).is_none()),
            ),
            (
                "only_cross_attention",
                self.only_cross_attention.resolve(blocks).is_none(),
            ),
        ];
        for (key, wrong_length) in per_block_checks {
            if wrong_length {
                return Err(bad(format!(
                    "`{key}` is a list whose length is not {blocks}"
                )));
            }
        }
        for (index, (&channels, &heads)) in self
            .block_out_channels
            .iter()
            .zip(self.heads_per_block().iter())
            .enumerate()
        {
            if heads == 0 || channels % heads != 0 {
                return Err(bad(format!(
                    "block {index}: {channels} channels cannot be split into {heads} attention heads \
                     (`attention_head_dim`/`num_attention_heads`)"
                )));
            }
        }
        Ok(())
    }

    /// Number of down (and up) blocks.
    pub fn block_count(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Width of the text embeddings (`[batch, seq, cross_attention_dim]`).
    pub fn text_embedding_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::Same(dim) => *dim,
            PerBlock::List(dims) => dims.first().copied().unwrap_or(0),
        }
    }

    /// Group count of every group norm (32).
    pub fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    /// Width of the timestep embedding after `time_embedding`.
    pub fn time_embedding_width(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Attention heads per down block: `num_attention_heads`, or diffusers' `attention_head_dim` quirk.
    pub fn heads_per_block(&self) -> Vec<usize> {
        let blocks = self.block_count();
        let source = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        source.resolve(blocks).unwrap_or_else(|| vec![8; blocks])
    }

    fn layers_per_block_resolved(&self) -> Vec<usize> {
        let blocks = self.block_count();
        self.layers_per_block
            .resolve(blocks)
            .unwrap_or_else(|| vec![2; blocks])
    }

    fn transformer_layers_resolved(&self) -> Vec<usize> {
        let blocks = self.block_count();
        self.transformer_layers_per_block
            .resolve(blocks)
            .unwrap_or_else(|| vec![1; blocks])
    }

    fn only_cross_resolved(&self) -> Vec<bool> {
        let blocks = self.block_count();
        self.only_cross_attention
            .resolve(blocks)
            .unwrap_or_else(|| vec![false; blocks])
    }

    /// The down blocks, in order.
    pub fn down_blocks(&self) -> Vec<DownBlockPlan> {
        let heads = self.heads_per_block();
        let layers = self.layers_per_block_resolved();
        let transformer_layers = self.transformer_layers_resolved();
        let only_cross = self.only_cross_resolved();
        let blocks = self.block_count();
        let mut out_channels = self.block_out_channels.first().copied().unwrap_or(0);
        (0..blocks)
            .map(|index| {
                let in_channels = out_channels;
                out_channels = self.block_out_channels[index];
                DownBlockPlan {
                    kind: self
                        .down_block_types
                        .get(index)
                        .and_then(|name| down_block_kind(name))
                        .unwrap_or(DownBlockKind::Plain),
                    in_channels,
                    out_channels,
                    layers: layers[index],
                    transformer_layers: transformer_layers[index],
                    heads: heads[index],
                    only_cross_attention: only_cross[index],
                    downsample: index + 1 < blocks,
                }
            })
            .collect()
    }

    /// The middle block, or `None` when `mid_block_type` is null.
    pub fn mid_block(&self) -> Option<MidBlockPlan> {
        self.mid_block_type.as_ref()?;
        let only_cross_attention = match (
            self.mid_block_only_cross_attention,
            &self.only_cross_attention,
        ) {
            (Some(value), _) => value,
            (None, PerBlock::Same(value)) => *value,
            (None, PerBlock::List(_)) => false,
        };
        Some(MidBlockPlan {
            channels: *self.block_out_channels.last()?,
            transformer_layers: *self.transformer_layers_resolved().last()?,
            heads: *self.heads_per_block().last()?,
            only_cross_attention,
        })
    }

    /// The up blocks, in order (deepest first), mirroring diffusers' reversed per-block lists.
    pub fn up_blocks(&self) -> Vec<UpBlockPlan> {
        let reversed_channels: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let reversed_heads: Vec<usize> = self.heads_per_block().into_iter().rev().collect();
        let reversed_layers: Vec<usize> =
            self.layers_per_block_resolved().into_iter().rev().collect();
        let reversed_transformer_layers: Vec<usize> = self
            .transformer_layers_resolved()
            .into_iter()
            .rev()
            .collect();
        let reversed_only_cross: Vec<bool> = self.only_cross_resolved().into_iter().rev().collect();
        let blocks = self.block_count();
        let mut out_channels = reversed_channels.first().copied().unwrap_or(0);
        (0..blocks)
            .map(|index| {
                let prev_output_channels = out_channels;
                out_channels = reversed_channels[index];
                UpBlockPlan {
                    kind: self
                        .up_block_types
                        .get(index)
                        .and_then(|name| up_block_kind(name))
                        .unwrap_or(UpBlockKind::Plain),
                    prev_output_channels,
                    in_channels: reversed_channels[(index + 1).min(blocks - 1)],
                    out_channels,
                    layers: reversed_layers[index] + 1,
                    transformer_layers: reversed_transformer_layers[index],
                    heads: reversed_heads[index],
                    only_cross_attention: reversed_only_cross[index],
                    upsample: index + 1 < blocks,
                }
            })
            .collect()
    }

    /// The config file path placeholder used when a config was built in memory.
    pub fn in_memory_path() -> PathBuf {
        PathBuf::from("<in-memory unet config>")
    }
}

fn down_block_kind(name: &str) -> Option<DownBlockKind> {
    match name {
        "CrossAttnDownBlock2D" => Some(DownBlockKind::CrossAttn),
        "DownBlock2D" => Some(DownBlockKind::Plain),
        _ => None,
    }
}

fn up_block_kind(name: &str) -> Option<UpBlockKind> {
    match name {
        "CrossAttnUpBlock2D" => Some(UpBlockKind::CrossAttn),
        "UpBlock2D" => Some(UpBlockKind::Plain),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PipelineResult<UnetConfig> {
        UnetConfig::from_json(text, &UnetConfig::in_memory_path())
    }

    #[test]
    fn defaults_are_sd15() {
        let config = parse("{}").unwrap();
        assert_eq!(config.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(config.heads_per_block(), vec![8; 4]);
        let down = config.down_blocks();
        assert_eq!(down[0].kind, DownBlockKind::CrossAttn);
        assert_eq!(down[3].kind, DownBlockKind::Plain);
        assert!(!down[3].downsample);
        let up = config.up_blocks();
        assert_eq!(up[0].kind, UpBlockKind::Plain);
        assert_eq!(up[1].prev_output_channels, 1280);
        assert_eq!(up[3].in_channels, 320);
        assert_eq!(up[3].layers, 3);
        assert_eq!(config.mid_block().unwrap().channels, 1280);
    }

    #[test]
    fn sd2_head_list_is_reversed_for_up_blocks() {
        let config =
            parse(r#"{"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": true}"#)
                .unwrap();
        assert_eq!(config.heads_per_block(), vec![5, 10, 20, 20]);
        let heads: Vec<usize> = config.up_blocks().iter().map(|b| b.heads).collect();
        assert_eq!(heads, vec![20, 20, 10, 5]);
    }

    #[test]
    fn unsupported_keys_are_named() {
        for (text, key) in [
            (
                r#"{"addition_embed_type": "text_time"}"#,
                "addition_embed_type",
            ),
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (
                r#"{"resnet_time_scale_shift": "scale_shift"}"#,
                "resnet_time_scale_shift",
            ),
            (r#"{"dual_cross_attention": true}"#, "dual_cross_attention"),
            (
                r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#,
                "mid_block_type",
            ),
            (
                r#"{"down_block_types": ["A", "B", "C", "D"]}"#,
                "down_block_types",
            ),
            (r#"{"layers_per_block": [1, 2]}"#, "layers_per_block"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(key), "{error} should name {key}");
        }
    }

    #[test]
    fn null_mid_block_means_none() {
        let config = parse(r#"{"mid_block_type": null}"#).unwrap();
        assert!(config.mid_block().is_none());
    }
}
