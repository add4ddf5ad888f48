//! Style Aligned (Hertz, Voynov et al., CVPR 2024): a batch of images whose first image (the
//! reference) lends its style to the others through shared self-attention.
//!
//! In every self-attention layer (down, mid and up; every step; both halves of classifier-free
//! guidance, each half with its own reference item: `feat[0]` and `feat[b/2]`), each target image
//! (every item but a half's first):
//! 1. has its queries and keys normalised to the reference's statistics (AdaIN per head and
//!    channel over the tokens, unbiased variance + 1e-5; values too when asked);
//! 2. attends to `concat(K_own, K_ref * scale)` with values `concat(V_own, V_ref)`;
//! 3. with a shift `s`, adds `s` to the logits of the reference's columns before the softmax
//!    (through the fused kernel with one extra channel per head, [`shifted_attention_fused`];
//!    [`shifted_attention`] is the explicit-probability form it is checked against).
//!
//! The reference items keep their own queries, keys and values and go through the layer's fused
//! kernel alone: the reference image is the same, value for value, as in the same batch without
//! sharing (the reference code gets the same result only mathematically: it lets the reference
//! attend to its own keys twice and normalises it to its own statistics).
//!
//! Group norm sharing ([`crate::hook::SharedGroupNorm`]): every group norm of the UNet
//! normalises a target with the statistics of its features concatenated with its reference's along
//! the height. The reference code also shares layer norms the same way, which changes nothing (a
//! layer norm normalises each token alone), so attend leaves them be.
//!
//! `only_self_level = x` leaves an evenly spaced fraction `x` of the self-attention layers plain,
//! counted in diffusers' order of `unet.attn_processors` (down blocks, up blocks, then the middle
//! block), with the reference's rule ([`plain_layer_switch`]).
//!
//! Beyond the reference's options, sharing can be limited to some blocks (encoder, middle,
//! decoder), to some resolutions (query grid sides) and to the first fraction of the steps
//! (attention and group norms both; later steps run every image alone).

use std::collections::HashSet;

use candle_core::{DType, Tensor};

use crate::analysis::heatmap::UnetPlace;
use crate::attention::batch_rows;
use crate::hook::{
    AttentionKind, AttentionProcessor, AttentionSite, LayerAttention, QueryKeyValue,
    SharedGroupNorm,
};
use crate::pipeline::unet::config::{DownBlockKind, UpBlockKind};
use crate::pipeline::unet::UnetConfig;

/// The variance offset of the AdaIN statistics (the reference's `eps`).
pub const ADAIN_EPS: f64 = 1e-5;

/// The settings of a shared-attention run, with the reference code's defaults.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StyleAlignedConfig {
    /// Group norms normalise a target with its reference's features too. Default true.
    pub share_group_norm: bool,
    /// The reference's keys are multiplied by this in the targets' attention. Default 1.
    pub shared_score_scale: f32,
    /// Added to the logits of the reference's columns in the targets' attention. Default 0 (the
    /// reference's image-reference notebook uses `ln 2`).
    pub shared_score_shift: f32,
    /// Fraction of the self-attention layers left plain, evenly spaced. Default 0 (all shared).
    pub only_self_level: f64,
    /// AdaIN of the targets' queries. Default true.
    pub adain_queries: bool,
    /// AdaIN of the targets' keys. Default true.
    pub adain_keys: bool,
    /// AdaIN of the targets' values. Default false.
    pub adain_values: bool,
    /// Share in the encoder's (down blocks') self-attention. Default true.
    #[serde(default = "default_true")]
    pub share_encoder: bool,
    /// Share in the middle block's self-attention. Default true.
    #[serde(default = "default_true")]
    pub share_middle: bool,
    /// Share in the decoder's (up blocks') self-attention. Default true.
    #[serde(default = "default_true")]
    pub share_decoder: bool,
    /// Share only in layers whose query grid side (the larger of its height and width, in latent
    /// pixels) is at least this. Default 0.
    #[serde(default)]
    pub min_shared_side: usize,
    /// Share only in layers whose query grid side is at most this; 0: no limit. Default 0.
    #[serde(default)]
    pub max_shared_side: usize,
    /// Share (attention and group norms) only in the first fraction of the steps: step `i` of
    /// `n` shares when `i < ceil(fraction * n)`. In `0..=1`; default 1 (every step).
    #[serde(default = "default_one")]
    pub shared_steps_fraction: f64,
}

fn default_true() -> bool {
    true
}

fn default_one() -> f64 {
    1.0
}

impl Default for StyleAlignedConfig {
    fn default() -> Self {
        Self {
            share_group_norm: true,
            shared_score_scale: 1.0,
            shared_score_shift: 0.0,
            only_self_level: 0.0,
            adain_queries: true,
            adain_keys: true,
            adain_values: false,
            share_encoder: true,
            share_middle: true,
            share_decoder: true,
            min_shared_side: 0,
            max_shared_side: 0,
            shared_steps_fraction: 1.0,
        }
    }
}

impl StyleAlignedConfig {
    /// attend's default, chosen by measurement on the bundled model (see the benchmarks): the
    /// reference's settings with a score shift of 2 (without it the targets rarely take the
    /// reference's background), sharing in the first half of the steps only (the background is
    /// laid down early), only in the layers of at least 32x32 queries and without AdaIN of the
    /// queries: shared coarse layers and queries normalised to the reference's copy the
    /// reference's layout, and the targets drew two or three copies of their object.
    pub fn measured_default() -> Self {
        Self {
            shared_score_shift: 2.0,
            shared_steps_fraction: 0.5,
            adain_queries: false,
            min_shared_side: 32,
            ..Self::default()
        }
    }
}

/// Errors of the settings.
#[derive(Debug, thiserror::Error)]
pub enum StyleAlignedError {
    /// A setting is out of range.
    #[error("invalid Style Aligned setting {name}: {reason}")]
    InvalidSetting {
        /// The setting (`only_self_level`, `shared_score_shift`, ...).
        name: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

impl StyleAlignedConfig {
    /// Checks the ranges: `only_self_level` and `shared_steps_fraction` in `0..=1`, finite scale
    /// and shift, `min_shared_side <= max_shared_side` when both are set.
    pub fn validate(&self) -> Result<(), StyleAlignedError> {
        for (name, value) in [
            ("only_self_level", self.only_self_level),
            ("shared_steps_fraction", self.shared_steps_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(StyleAlignedError::InvalidSetting {
                    name,
                    reason: format!("{value} is outside 0..1"),
                });
            }
        }
        if self.max_shared_side != 0 && self.min_shared_side > self.max_shared_side {
            return Err(StyleAlignedError::InvalidSetting {
                name: "min_shared_side",
                reason: format!(
                    "{} is above max_shared_side {}",
                    self.min_shared_side, self.max_shared_side
                ),
            });
        }
        for (name, value) in [
            ("shared_score_scale", self.shared_score_scale),
            ("shared_score_shift", self.shared_score_shift),
        ] {
            if !value.is_finite() || value.abs() > 100.0 {
                return Err(StyleAlignedError::InvalidSetting {
                    name,
                    reason: format!("{value} is not a finite number in -100..100"),
                });
            }
        }
        Ok(())
    }

    /// Steps of a run of `step_count` steps that share: `ceil(shared_steps_fraction * step_count)`.
    pub fn shared_step_count(&self, step_count: usize) -> usize {
        ((self.shared_steps_fraction * step_count as f64).ceil() as usize).min(step_count)
    }

    /// Whether a self-attention layer at `place` with a query grid side of `side` latent pixels
    /// shares (the block and resolution limits; `only_self_level` is applied separately).
    pub fn shares_at(&self, place: UnetPlace, side: usize) -> bool {
        let place_shared = match place {
            UnetPlace::Down => self.share_encoder,
            UnetPlace::Mid => self.share_middle,
            UnetPlace::Up => self.share_decoder,
        };
        place_shared
            && side >= self.min_shared_side
            && (self.max_shared_side == 0 || side <= self.max_shared_side)
    }
}

/// One self-attention layer: (place, block index, attention index, transformer layer index).
pub type SelfLayer = (UnetPlace, usize, usize, usize);

/// The self-attention layers of a UNet in diffusers' order of `unet.attn_processors`: down
/// blocks, up blocks, then the middle block (the order `only_self_level` counts in).
pub fn self_attention_layers(config: &UnetConfig) -> Vec<SelfLayer> {
    let mut layers = Vec::new();
    for (block, plan) in config.down_blocks().iter().enumerate() {
        if plan.kind == DownBlockKind::CrossAttn {
            for attention in 0..plan.layers {
                for layer in 0..plan.transformer_layers {
                    layers.push((UnetPlace::Down, block, attention, layer));
                }
            }
        }
    }
    for (block, plan) in config.up_blocks().iter().enumerate() {
        if plan.kind == UpBlockKind::CrossAttn {
            for attention in 0..plan.layers {
                for layer in 0..plan.transformer_layers {
                    layers.push((UnetPlace::Up, block, attention, layer));
                }
            }
        }
    }
    if let Some(mid) = config.mid_block() {
        for layer in 0..mid.transformer_layers {
            layers.push((UnetPlace::Mid, 0, 0, layer));
        }
    }
    layers
}

/// Which of `total` layers stay plain at `level` (the reference's `_get_switch_vec`): none at 0,
/// all at 1; for `level <= 0.5` every `total / floor(level * total)`-th layer from the first;
/// above 0.5 the complement of the rule for `1 - level`.
pub fn plain_layer_switch(total: usize, level: f64) -> Vec<bool> {
    if level <= 0.0 {
        return vec![false; total];
    }
    if level >= 1.0 {
        return vec![true; total];
    }
    let flip = level > 0.5;
    let level = if flip { 1.0 - level } else { level };
    let switched = (level * total as f64) as usize;
    (0..total)
        .map(|index| {
            let chosen = switched > 0 && index % (total / switched).max(1) == 0;
            chosen != flip
        })
        .collect()
}

/// Mean and standard deviation over the tokens of `features` `[batch, tokens, channels]`: each
/// `[batch, 1, channels]`, the standard deviation `sqrt(unbiased variance + eps)`.
pub fn token_statistics(features: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let features = features.to_dtype(DType::F32)?;
    let tokens = features.dim(1)?;
    let mean = features.mean_keepdim(1)?;
    let centered = features.broadcast_sub(&mean)?;
    let denominator = tokens.saturating_sub(1).max(1) as f64;
    let variance = centered
        .sqr()?
        .sum_keepdim(1)?
        .affine(1.0 / denominator, 0.0)?;
    let std = variance.affine(1.0, eps)?.sqrt()?;
    Ok((mean, std))
}

/// AdaIN: `features` `[batch, tokens, channels]` normalised per item and channel over the tokens,
/// then given `target_mean` and `target_std` (`[batch, 1, channels]`, e.g. the reference's
/// [`token_statistics`]). Returns f32.
pub fn adain(
    features: &Tensor,
    target_mean: &Tensor,
    target_std: &Tensor,
) -> candle_core::Result<Tensor> {
    let (mean, std) = token_statistics(features, ADAIN_EPS)?;
    features
        .to_dtype(DType::F32)?
        .broadcast_sub(&mean)?
        .broadcast_div(&std)?
        .broadcast_mul(target_std)?
        .broadcast_add(target_mean)
}

/// `softmax(q k^T * scale + shift on the keys from `own_keys` on) v` per head, with explicit
/// probabilities: `query` `[batch, queries, inner]`, `key`/`value` `[batch, keys, inner]` ->
/// `[batch, queries, inner]` f32. One item at a time (its scores `[heads, queries, keys]`).
pub fn shifted_attention(
    projections: &QueryKeyValue,
    heads: usize,
    scale: f32,
    own_keys: usize,
    shift: f32,
) -> candle_core::Result<Tensor> {
    let (batch, queries, inner) = projections.query.dims3()?;
    let keys = projections.key.dim(1)?;
    if heads == 0 || inner % heads != 0 || own_keys > keys {
        candle_core::bail!(
            "shifted attention: {inner} channels, {heads} heads, {own_keys} own keys of {keys}"
        );
    }
    let head_dim = inner / heads;
    let split = |xs: &Tensor, tokens: usize| -> candle_core::Result<Tensor> {
        xs.to_dtype(DType::F32)?
            .reshape((tokens, heads, head_dim))?
            .transpose(0, 1)?
            .contiguous()
    };
    let column_shift: Vec<f32> = (0..keys)
        .map(|key| if key < own_keys { 0.0 } else { shift })
        .collect();
    let column_shift = Tensor::from_vec(column_shift, (1, 1, keys), projections.query.device())?;
    let mut items = Vec::with_capacity(batch);
    for item in 0..batch {
        let query = split(&projections.query.get(item)?, queries)?;
        let key = split(&projections.key.get(item)?, keys)?;
        let value = split(&projections.value.get(item)?, keys)?;
        let logits = query
            .matmul(&key.transpose(1, 2)?.contiguous()?)?
            .affine(f64::from(scale), 0.0)?
            .broadcast_add(&column_shift)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&logits)?;
        let attended = probabilities.matmul(&value)?; // [heads, queries, head_dim]
        items.push(
            attended
                .transpose(0, 1)?
                .contiguous()?
                .reshape((queries, inner))?,
        );
    }
    Tensor::stack(&items, 0)
}

/// [`shifted_attention`] through the fused attention kernel, the probabilities never
/// materialised: each head gets one more channel, 1 in every query, `shift / scale` in the keys
/// from `own_keys` on (0 before), 0 in the values, so that `scale * q' k'^T = scale * q k^T +
/// shift` on the shifted columns; the extra output channel is dropped. Same shapes as
/// [`shifted_attention`]; equal up to float rounding.
pub fn shifted_attention_fused(
    projections: &QueryKeyValue,
    heads: usize,
    scale: f32,
    own_keys: usize,
    shift: f32,
) -> candle_core::Result<Tensor> {
    let (batch, queries, inner) = projections.query.dims3()?;
    let keys = projections.key.dim(1)?;
    if heads == 0 || inner % heads != 0 || own_keys > keys || scale == 0.0 {
        candle_core::bail!(
            "shifted attention: {inner} channels, {heads} heads, {own_keys} own keys of {keys}, \
             scale {scale}"
        );
    }
    let head_dim = inner / heads;
    let device = projections.query.device();
    // `[batch, tokens, heads * head_dim]` plus one channel per head holding `extra`
    // (`[batch, tokens, heads, 1]`).
    let widen = |xs: &Tensor, tokens: usize, extra: &Tensor| -> candle_core::Result<Tensor> {
        Tensor::cat(
            &[
                &xs.to_dtype(DType::F32)?
                    .reshape((batch, tokens, heads, head_dim))?,
                extra,
            ],
            3,
        )?
        .reshape((batch, tokens, heads * (head_dim + 1)))
    };
    let ones = Tensor::ones((batch, queries, heads, 1), DType::F32, device)?;
    let bias: Vec<f32> = (0..keys)
        .map(|key| if key < own_keys { 0.0 } else { shift / scale })
        .collect();
    let bias =
        Tensor::from_vec(bias, (1, keys, 1, 1), device)?.broadcast_as((batch, keys, heads, 1))?;
    let zeros = Tensor::zeros((batch, keys, heads, 1), DType::F32, device)?;
    let query = widen(&projections.query, queries, &ones)?;
    let key = widen(&projections.key, keys, &bias.contiguous()?)?;
    let value = widen(&projections.value, keys, &zeros)?;
    let key_t = crate::kernels::split_heads_transposed(&key, heads)?;
    let output = crate::kernels::fused_attention(&query, &key_t, &value, heads, scale)?;
    output
        .reshape((batch, queries, heads, head_dim + 1))?
        .narrow(3, 0, head_dim)?
        .contiguous()?
        .reshape((batch, queries, inner))
}

/// The reference item of batch item `item`: the first item of its CFG half.
fn reference_of(item: usize, items_per_half: usize) -> usize {
    item - item % items_per_half
}

/// The shared-attention processor (see the module docs). Put it first on the hook: it computes
/// the output of the self-attention layers it shares, which then have no probability stage (an
/// observer after it still sees every cross-attention layer and the plain self-attention ones).
pub struct StyleAligned {
    config: StyleAlignedConfig,
    /// The self-attention layers that share (the others stay plain).
    shared_layers: HashSet<SelfLayer>,
    /// Whether the current step shares (set by [`StyleAligned::begin_step`]).
    step_shares: bool,
}

impl StyleAligned {
    /// The processor for a UNet built from `unet` (its self-attention layers, to place
    /// `only_self_level`).
    pub fn new(config: StyleAlignedConfig, unet: &UnetConfig) -> Result<Self, StyleAlignedError> {
        config.validate()?;
        let layers = self_attention_layers(unet);
        let plain = plain_layer_switch(layers.len(), config.only_self_level);
        let shared_layers = layers
            .into_iter()
            .zip(plain)
            .filter(|(_, plain)| !plain)
            .map(|(layer, _)| layer)
            .collect();
        Ok(Self {
            config,
            shared_layers,
            step_shares: true,
        })
    }

    /// Tells the processor which step comes next, so that group norms share only in the steps
    /// that share (attention layers read the step from their site). Until called, group norms
    /// share.
    pub fn begin_step(&mut self, step_index: usize, step_count: usize) {
        self.step_shares = step_index < self.config.shared_step_count(step_count);
    }

    /// The settings.
    pub fn config(&self) -> &StyleAlignedConfig {
        &self.config
    }

    /// Number of self-attention layers that share.
    pub fn shared_layer_count(&self) -> usize {
        self.shared_layers.len()
    }

    /// Items per CFG half when the batch holds a reference and at least one target.
    fn items_per_half(batch: usize, cfg: bool) -> Option<usize> {
        let halves = if cfg { 2 } else { 1 };
        let items = batch / halves;
        (batch.is_multiple_of(halves) && items >= 2).then_some(items)
    }

    /// The targets' attention output `[targets, queries, inner]`.
    fn targets_output(
        &self,
        projections: &QueryKeyValue,
        targets: &[usize],
        items_per_half: usize,
        site: &AttentionSite,
        layer: &dyn LayerAttention,
    ) -> candle_core::Result<Tensor> {
        let references: Vec<usize> = targets
            .iter()
            .map(|&item| reference_of(item, items_per_half))
            .collect();
        let dtype = projections.query.dtype();
        let normalised = |xs: &Tensor, wanted: bool| -> candle_core::Result<Tensor> {
            let own = batch_rows(xs, targets)?;
            if !wanted {
                return Ok(own);
            }
            let (mean, std) = token_statistics(&batch_rows(xs, &references)?, ADAIN_EPS)?;
            adain(&own, &mean, &std)?.to_dtype(dtype)
        };
        let query = normalised(&projections.query, self.config.adain_queries)?;
        let own_key = normalised(&projections.key, self.config.adain_keys)?;
        let own_value = normalised(&projections.value, self.config.adain_values)?;
        let reference_key = batch_rows(&projections.key, &references)?;
        let reference_key = if self.config.shared_score_scale == 1.0 {
            reference_key
        } else {
            reference_key.affine(f64::from(self.config.shared_score_scale), 0.0)?
        };
        let reference_value = batch_rows(&projections.value, &references)?;
        let shared = QueryKeyValue {
            query: query.contiguous()?,
            key: Tensor::cat(&[&own_key, &reference_key], 1)?.contiguous()?,
            value: Tensor::cat(&[&own_value, &reference_value], 1)?.contiguous()?,
        };
        if self.config.shared_score_shift == 0.0 {
            return layer.attend(&shared);
        }
        shifted_attention_fused(
            &shared,
            site.heads,
            layer.scale(),
            projections.key.dim(1)?,
            self.config.shared_score_shift,
        )?
        .to_dtype(dtype)
    }
}

impl AttentionProcessor for StyleAligned {
    fn wants_attention_output(&self, site: &AttentionSite) -> bool {
        site.kind == AttentionKind::SelfAttention
            // `only_cross_attention` models give `attn1` the text: nothing to share.
            && site.keys == site.queries()
            && Self::items_per_half(site.batch, site.cfg).is_some()
            && site.step_index < self.config.shared_step_count(site.step_count)
            && self.config.shares_at(site.place, site.query_h.max(site.query_w))
            && self.shared_layers.contains(&(
                site.place,
                site.block_index,
                site.attention_index,
                site.layer_index,
            ))
    }

    fn compute_attention_output(
        &mut self,
        site: &AttentionSite,
        projections: &QueryKeyValue,
        layer: &dyn LayerAttention,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(items_per_half) = Self::items_per_half(site.batch, site.cfg) else {
            return Ok(None);
        };
        let (references, targets): (Vec<usize>, Vec<usize>) =
            (0..site.batch).partition(|&item| item % items_per_half == 0);
        // The references alone, through the fused kernel: the values of a run without sharing.
        let reference_output = layer.attend(&QueryKeyValue {
            query: batch_rows(&projections.query, &references)?,
            key: batch_rows(&projections.key, &references)?,
            value: batch_rows(&projections.value, &references)?,
        })?;
        let target_output =
            self.targets_output(projections, &targets, items_per_half, site, layer)?;
        let mut rows = Vec::with_capacity(site.batch);
        let (mut next_reference, mut next_target) = (0, 0);
        for item in 0..site.batch {
            if item % items_per_half == 0 {
                rows.push(reference_output.narrow(0, next_reference, 1)?);
                next_reference += 1;
            } else {
                rows.push(target_output.narrow(0, next_target, 1)?);
                next_target += 1;
            }
        }
        Ok(Some(Tensor::cat(&rows, 0)?))
    }

    fn wants_probabilities(&self, _site: &AttentionSite) -> bool {
        false
    }

    fn process_probabilities(
        &mut self,
        _site: &AttentionSite,
        _probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    fn shared_group_norm(&self, batch: usize, cfg: bool) -> Option<SharedGroupNorm> {
        if !self.config.share_group_norm || !self.step_shares {
            return None;
        }
        let items_per_half = Self::items_per_half(batch, cfg)?;
        Some(SharedGroupNorm {
            references: (0..batch)
                .map(|item| Some(reference_of(item, items_per_half)))
                .collect(),
        })
    }
}

/// Per item and channel statistics as plain numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStatistics {
    /// `[batch][channels]` means over the tokens.
    pub mean: Vec<Vec<f32>>,
    /// `[batch][channels]` `sqrt(unbiased variance + ADAIN_EPS)` over the tokens.
    pub std: Vec<Vec<f32>>,
}

/// The [`token_statistics`] of `features` `[batch, tokens, channels]` as plain numbers (for
/// checks and reports).
pub fn statistics_per_channel(features: &Tensor) -> candle_core::Result<ChannelStatistics> {
    let (mean, std) = token_statistics(features, ADAIN_EPS)?;
    Ok(ChannelStatistics {
        mean: mean.squeeze(1)?.to_vec2::<f32>()?,
        std: std.squeeze(1)?.to_vec2::<f32>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let count = shape.0 * shape.1 * shape.2;
        let values: Vec<f32> = (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn adain_gives_the_reference_statistics() {
        let features = random((2, 50, 6), 1).affine(3.0, 1.5).unwrap();
        let reference = random((2, 50, 6), 2).affine(0.5, -2.0).unwrap();
        let (mean, std) = token_statistics(&reference, ADAIN_EPS).unwrap();
        let moved = adain(&features, &mean, &std).unwrap();
        let moved = statistics_per_channel(&moved).unwrap();
        let wanted = statistics_per_channel(&reference).unwrap();
        for item in 0..2 {
            for channel in 0..6 {
                let mean_diff = (moved.mean[item][channel] - wanted.mean[item][channel]).abs();
                let std_diff = (moved.std[item][channel] - wanted.std[item][channel]).abs();
                assert!(mean_diff < 1e-5, "mean {item} {channel}: {mean_diff}");
                // The eps enters twice (normalising, then the target std).
                assert!(std_diff < 1e-4, "std {item} {channel}: {std_diff}");
            }
        }
        // Unbiased variance: two tokens 0 and 2 have variance 2.
        let pair = Tensor::from_vec(vec![0f32, 2.0], (1, 2, 1), &Device::Cpu).unwrap();
        let (_, std) = token_statistics(&pair, 0.0).unwrap();
        let std = std.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((std - 2f32.sqrt()).abs() < 1e-6, "{std}");
    }

    #[test]
    fn switch_follows_the_reference_rule() {
        assert_eq!(plain_layer_switch(4, 0.0), vec![false; 4]);
        assert_eq!(plain_layer_switch(4, 1.0), vec![true; 4]);
        // 16 layers, level 0.25: 4 switched, every 4th from the first.
        let quarter = plain_layer_switch(16, 0.25);
        assert_eq!(quarter.iter().filter(|&&plain| plain).count(), 4);
        assert!(quarter[0] && quarter[4] && quarter[8] && quarter[12]);
        // Level 0.75: the complement of 0.25.
        let three_quarters = plain_layer_switch(16, 0.75);
        assert!(quarter.iter().zip(&three_quarters).all(|(a, b)| a != b));
        // A level too small to switch one layer switches none.
        assert_eq!(plain_layer_switch(4, 0.1), vec![false; 4]);
    }

    #[test]
    fn shift_equals_scaled_and_renormalised_reference_columns() {
        let heads = 2;
        let projections = QueryKeyValue {
            query: random((1, 5, 8), 3),
            key: random((1, 12, 8), 4),
            value: random((1, 12, 8), 5),
        };
        let scale = 0.5;
        let shift = 0.7f32;
        let shifted = shifted_attention(&projections, heads, scale, 6, shift).unwrap();
        // Probabilities without the shift, reference columns times e^shift, rows renormalised.
        let plain = |item_projections: &QueryKeyValue| -> Tensor {
            let head_dim = 4;
            let split = |xs: &Tensor, tokens: usize| {
                xs.get(0)
                    .unwrap()
                    .reshape((tokens, heads, head_dim))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let query = split(&item_projections.query, 5);
            let key = split(&item_projections.key, 12);
            let value = split(&item_projections.value, 12);
            let logits = query
                .matmul(&key.transpose(1, 2).unwrap().contiguous().unwrap())
                .unwrap()
                .affine(f64::from(scale), 0.0)
                .unwrap();
            let probabilities = candle_nn::ops::softmax_last_dim(&logits).unwrap();
            let weights: Vec<f32> = (0..12)
                .map(|key| if key < 6 { 1.0 } else { shift.exp() })
                .collect();
            let weights = Tensor::from_vec(weights, (1, 1, 12), &Device::Cpu).unwrap();
            let weighted = probabilities.broadcast_mul(&weights).unwrap();
            let renormalised = weighted
                .broadcast_div(&weighted.sum_keepdim(2).unwrap())
                .unwrap();
            renormalised
                .matmul(&value)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((1, 5, 8))
                .unwrap()
        };
        let expected = plain(&projections);
        let diff = (&shifted - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        // The fused path computes the same.
        let fused = shifted_attention_fused(&projections, heads, scale, 6, shift).unwrap();
        let diff = (shifted - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "fused: {diff}");
    }
}
