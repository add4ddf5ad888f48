//! Cross-image attention (Alaluf, Garibi et al., SIGGRAPH 2024): the output image's queries,
//! computed on the structure image's latents, attend to the keys and values of the appearance
//! image, so that semantically matching parts take the appearance's look.
//!
//! The processor ([`CrossImageAttention`]) acts on the decoder's (up blocks') self-attention at
//! the two finest query resolutions that have attention, and only on the batch item of the output
//! that swaps ([`CrossImageBatch::output_swap`]):
//! - its keys and values are the appearance item's, or on the steps the run says so
//!   ([`KeySource::Structure`]) the structure item's;
//! - its attention map is contrasted ([`contrast_probabilities`]):
//!   `clip((A - 1/K) c + 1/K, 0, 1)`, without renormalising, as the reference does;
//! - at the finest grid, while it attends the appearance, the map averaged over heads is summed
//!   into a correspondence record ([`CrossImageAttention::correspondence`]).
//!
//! Every other item (the appearance, the structure, and the output's plain pass of swap
//! guidance) attends its own keys and values through the layer's fused kernel: unchanged.
//!
//! [`masked_adain`] is the latent statistics transfer the run applies between steps.

use candle_core::{DType, Tensor};

use crate::analysis::appearance::Correspondence;
use crate::analysis::heatmap::UnetPlace;
use crate::attention::batch_rows;
use crate::hook::{
    AttentionKind, AttentionProcessor, AttentionSite, LayerAttention, QueryKeyValue,
};
use crate::pipeline::unet::config::UpBlockKind;
use crate::pipeline::unet::UnetConfig;

/// The variance offset of the masked AdaIN statistics (the reference's `eps`).
pub const MASKED_ADAIN_EPS: f64 = 1e-5;

/// Whose keys and values the output attends in a mixing layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The appearance image's (the transfer).
    Appearance,
    /// The structure image's (the reference's every fifth early step, to keep the layout).
    Structure,
}

/// Where each image sits in the UNet batch (no classifier-free guidance: one item per row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossImageBatch {
    /// The output item whose queries attend the other image.
    pub output_swap: usize,
    /// The output's plain pass (swap guidance's `eps_noswap`), when the batch holds one.
    pub output_plain: Option<usize>,
    /// The appearance image's item.
    pub appearance: usize,
    /// The structure image's item.
    pub structure: usize,
    /// Items in the batch.
    pub batch: usize,
}

impl CrossImageBatch {
    /// `[output, appearance, structure]`, or with `plain_output`
    /// `[output, output plain, appearance, structure]`.
    pub fn new(plain_output: bool) -> Self {
        if plain_output {
            Self {
                output_swap: 0,
                output_plain: Some(1),
                appearance: 2,
                structure: 3,
                batch: 4,
            }
        } else {
            Self {
                output_swap: 0,
                output_plain: None,
                appearance: 1,
                structure: 2,
                batch: 3,
            }
        }
    }
}

/// What the processor does during one UNet call (set by the run before each call).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossImageStep {
    /// The batch layout.
    pub batch: CrossImageBatch,
    /// Mix at the finest grid.
    pub mix_fine: bool,
    /// Mix at the second finest grid.
    pub mix_coarse: bool,
    /// Whose keys and values the output attends.
    pub keys_from: KeySource,
}

/// `clip((A - 1/K) c + 1/K, 0, 1)` for probabilities `A` `[..., K]` (the last dimension the keys):
/// a row spreads around its uniform value `1/K` by `contrast`; a uniform row is unchanged, and
/// `contrast = 1` returns the probabilities as they are.
pub fn contrast_probabilities(
    probabilities: &Tensor,
    contrast: f64,
) -> candle_core::Result<Tensor> {
    #[allow(clippy::float_cmp)]
    if contrast == 1.0 {
        return Ok(probabilities.clone());
    }
    let keys = probabilities.dims().last().copied().unwrap_or(1).max(1);
    let uniform = 1.0 / keys as f64;
    probabilities
        .affine(contrast, uniform * (1.0 - contrast))?
        .clamp(0f32, 1f32)
}

/// Masked AdaIN of `content` `[1, c, h, w]` to `style` `[1, c, h, w]`: per channel, the content's
/// pixels inside `content_mask` (`[h, w]`, 0 / 1) are normalised with their own mean and standard
/// deviation and given the mean and standard deviation of the style's pixels inside `style_mask`
/// (`sqrt(unbiased variance + 1e-5)`); pixels outside `content_mask` keep their value
/// (`content (1 - m) + adain m`). An empty mask returns `content` unchanged. Returns f32.
pub fn masked_adain(
    content: &Tensor,
    style: &Tensor,
    content_mask: &[f32],
    style_mask: &[f32],
) -> candle_core::Result<Tensor> {
    let (batch, channels, h, w) = content.dims4()?;
    if batch != 1 || style.dims4()? != (1, channels, h, w) {
        candle_core::bail!(
            "masked AdaIN: content {:?} and style {:?} must both be [1, c, h, w] of one size",
            content.dims(),
            style.dims()
        );
    }
    let cells = h * w;
    if content_mask.len() != cells || style_mask.len() != cells {
        candle_core::bail!(
            "masked AdaIN: masks of {} and {} values for a {h}x{w} latent",
            content_mask.len(),
            style_mask.len()
        );
    }
    let content = content.to_dtype(DType::F32)?;
    let inside = |mask: &[f32]| mask.iter().filter(|&&value| value >= 0.5).count();
    if inside(content_mask) == 0 || inside(style_mask) == 0 {
        return Ok(content);
    }
    let statistics = |values: &[f32], mask: &[f32]| -> Vec<(f64, f64)> {
        (0..channels)
            .map(|channel| {
                let plane = &values[channel * cells..(channel + 1) * cells];
                let picked: Vec<f64> = plane
                    .iter()
                    .zip(mask)
                    .filter(|(_, &m)| m >= 0.5)
                    .map(|(&value, _)| f64::from(value))
                    .collect();
                let count = picked.len() as f64;
                let mean = picked.iter().sum::<f64>() / count;
                let denominator = (count - 1.0).max(1.0);
                let variance = picked
                    .iter()
                    .map(|value| (value - mean).powi(2))
                    .sum::<f64>()
                    / denominator;
                (mean, (variance + MASKED_ADAIN_EPS).sqrt())
            })
            .collect()
    };
    let content_values = content.flatten_all()?.to_vec1::<f32>()?;
    let style_values = style
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let content_stats = statistics(&content_values, content_mask);
    let style_stats = statistics(&style_values, style_mask);
    let mut moved = content_values;
    for channel in 0..channels {
        let (content_mean, content_std) = content_stats[channel];
        let (style_mean, style_std) = style_stats[channel];
        let plane = &mut moved[channel * cells..(channel + 1) * cells];
        for (value, &m) in plane.iter_mut().zip(content_mask) {
            let m = f64::from(m.clamp(0.0, 1.0));
            if m == 0.0 {
                continue;
            }
            let original = f64::from(*value);
            let normalised = (original - content_mean) / content_std * style_std + style_mean;
            *value = (original * (1.0 - m) + normalised * m) as f32;
        }
    }
    Tensor::from_vec(moved, (1, channels, h, w), content.device())
}

/// The up-block indices of the two finest decoder resolutions with self-attention: `(finest,
/// second finest)`; the second is `None` when only one resolution has attention (and both are
/// `None` without any).
pub fn mixing_blocks(unet: &UnetConfig) -> (Option<usize>, Option<usize>) {
    let mut blocks = unet
        .up_blocks()
        .iter()
        .enumerate()
        .filter(|(_, plan)| plan.kind == UpBlockKind::CrossAttn && !plan.only_cross_attention)
        .map(|(index, _)| index)
        .collect::<Vec<_>>();
    // Up blocks go from the deepest (coarsest) to the finest.
    blocks.reverse();
    (blocks.first().copied(), blocks.get(1).copied())
}

/// The cross-image attention processor (see the module docs). Put it first on the hook.
pub struct CrossImageAttention {
    contrast: f64,
    fine_block: Option<usize>,
    coarse_block: Option<usize>,
    step: Option<CrossImageStep>,
    /// `[queries, keys]` sum of head-averaged maps of the output over the appearance.
    correspondence_sum: Option<Tensor>,
    correspondence_grid: (usize, usize),
    correspondence_calls: usize,
}

impl CrossImageAttention {
    /// The processor for a UNet built from `unet`, contrasting with `contrast` (1: none).
    pub fn new(unet: &UnetConfig, contrast: f64) -> Self {
        let (fine_block, coarse_block) = mixing_blocks(unet);
        Self {
            contrast,
            fine_block,
            coarse_block,
            step: None,
            correspondence_sum: None,
            correspondence_grid: (0, 0),
            correspondence_calls: 0,
        }
    }

    /// Sets what the next UNet call does; `None` leaves every layer plain.
    pub fn set_step(&mut self, step: Option<CrossImageStep>) {
        self.step = step;
    }

    /// True when some layer of the decoder can mix (the UNet has decoder self-attention).
    pub fn can_mix(&self) -> bool {
        self.fine_block.is_some()
    }

    /// Whether `site` mixes in the current call, and at the finest grid.
    fn mixing(&self, site: &AttentionSite) -> Option<(CrossImageStep, bool)> {
        let step = self.step?;
        if site.kind != AttentionKind::SelfAttention
            || site.place != UnetPlace::Up
            || site.keys != site.queries()
            || site.batch != step.batch.batch
        {
            return None;
        }
        let fine = Some(site.block_index) == self.fine_block;
        let coarse = Some(site.block_index) == self.coarse_block;
        ((fine && step.mix_fine) || (coarse && step.mix_coarse)).then_some((step, fine))
    }

    /// The output item's attention over `source`'s keys and values, contrasted: `[1, queries,
    /// inner]`; the head-averaged map (before the contrast) goes to the correspondence when
    /// `record`.
    fn output_attention(
        &mut self,
        site: &AttentionSite,
        projections: &QueryKeyValue,
        output: usize,
        source: usize,
        record: bool,
        scale: f32,
    ) -> candle_core::Result<Tensor> {
        let (_, queries, inner) = projections.query.dims3()?;
        let keys = projections.key.dim(1)?;
        let heads = site.heads;
        if heads == 0 || inner % heads != 0 {
            candle_core::bail!("cross-image attention: {inner} channels for {heads} heads");
        }
        let head_dim = inner / heads;
        let dtype = projections.query.dtype();
        let split = |xs: &Tensor, tokens: usize| -> candle_core::Result<Tensor> {
            xs.to_dtype(DType::F32)?
                .reshape((tokens, heads, head_dim))?
                .transpose(0, 1)?
                .contiguous()
        };
        let query = split(&projections.query.get(output)?, queries)?;
        let key = split(&projections.key.get(source)?, keys)?;
        let value = split(&projections.value.get(source)?, keys)?;
        let mut per_head = Vec::with_capacity(heads);
        let mut map_sum: Option<Tensor> = None;
        for head in 0..heads {
            let q = query.get(head)?;
            let k = key.get(head)?;
            let v = value.get(head)?;
            let logits = q
                .matmul(&k.t()?.contiguous()?)?
                .affine(f64::from(scale), 0.0)?;
            let probabilities = candle_nn::ops::softmax_last_dim(&logits)?;
            if record {
                map_sum = Some(match map_sum {
                    Some(sum) => (sum + &probabilities)?,
                    None => probabilities.clone(),
                });
            }
            let contrasted = contrast_probabilities(&probabilities, self.contrast)?;
            per_head.push(contrasted.matmul(&v)?); // [queries, head_dim]
        }
        if let Some(sum) = map_sum {
            let mean = sum.affine(1.0 / heads as f64, 0.0)?;
            self.correspondence_sum = Some(match self.correspondence_sum.take() {
                Some(total) if total.dims() == mean.dims() => (total + mean)?,
                _ => {
                    self.correspondence_calls = 0;
                    mean
                }
            });
            self.correspondence_grid = (site.query_h, site.query_w);
            self.correspondence_calls += 1;
        }
        Tensor::stack(&per_head, 0)? // [heads, queries, head_dim]
            .transpose(0, 1)?
            .contiguous()?
            .reshape((1, queries, inner))?
            .to_dtype(dtype)
    }

    /// The correspondence recorded so far, as plain data for an image of `image_h x image_w`
    /// pixels (see [`Correspondence`]); empty when the appearance was never attended.
    pub fn correspondence(
        &self,
        image_h: usize,
        image_w: usize,
    ) -> candle_core::Result<Correspondence> {
        let Some(sum) = &self.correspondence_sum else {
            return Ok(Correspondence {
                image_h,
                image_w,
                ..Correspondence::default()
            });
        };
        let (grid_h, grid_w) = self.correspondence_grid;
        let calls = self.correspondence_calls.max(1);
        let mean = sum.affine(1.0 / calls as f64, 0.0)?;
        let top_key = mean
            .argmax_keepdim(1)?
            .flatten_all()?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let values = mean.flatten_all()?.to_vec1::<f32>()?;
        let cells = grid_h * grid_w;
        let pool = grid_h
            .max(grid_w)
            .div_ceil(Correspondence::MAX_MAP_SIDE)
            .max(1);
        let (map_h, map_w) = (grid_h.div_ceil(pool), grid_w.div_ceil(pool));
        let mut maps = vec![0f32; cells * map_h * map_w];
        for query in 0..cells {
            let row = &values[query * cells..(query + 1) * cells];
            let pooled = &mut maps[query * map_h * map_w..(query + 1) * map_h * map_w];
            for (key, &value) in row.iter().enumerate() {
                let (y, x) = (key / grid_w / pool, key % grid_w / pool);
                pooled[y * map_w + x] += value;
            }
        }
        Ok(Correspondence {
            grid_h,
            grid_w,
            image_h,
            image_w,
            top_key,
            map_h,
            map_w,
            maps,
            layer_calls: self.correspondence_calls,
        })
    }
}

impl AttentionProcessor for CrossImageAttention {
    fn wants_attention_output(&self, site: &AttentionSite) -> bool {
        self.mixing(site).is_some()
    }

    fn compute_attention_output(
        &mut self,
        site: &AttentionSite,
        projections: &QueryKeyValue,
        layer: &dyn LayerAttention,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some((step, fine)) = self.mixing(site) else {
            return Ok(None);
        };
        let batch = step.batch;
        let source = match step.keys_from {
            KeySource::Appearance => batch.appearance,
            KeySource::Structure => batch.structure,
        };
        let record = fine && step.keys_from == KeySource::Appearance;
        let swapped = self.output_attention(
            site,
            projections,
            batch.output_swap,
            source,
            record,
            layer.scale(),
        )?;
        // Every other item attends its own keys and values, unchanged.
        let others: Vec<usize> = (0..batch.batch)
            .filter(|&item| item != batch.output_swap)
            .collect();
        let own = layer.attend(&QueryKeyValue {
            query: batch_rows(&projections.query, &others)?,
            key: batch_rows(&projections.key, &others)?,
            value: batch_rows(&projections.value, &others)?,
        })?;
        let mut rows = Vec::with_capacity(batch.batch);
        let mut next_other = 0;
        for item in 0..batch.batch {
            if item == batch.output_swap {
                rows.push(swapped.clone());
            } else {
                rows.push(own.narrow(0, next_other, 1)?);
                next_other += 1;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn contrast_spreads_rows_around_uniform() {
        let probabilities = Tensor::from_vec(
            vec![0.25f32, 0.25, 0.25, 0.25, 0.7, 0.1, 0.1, 0.1],
            (2, 4),
            &Device::Cpu,
        )
        .unwrap();
        let contrasted = contrast_probabilities(&probabilities, 2.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(contrasted[0], vec![0.25; 4]);
        assert!((contrasted[1][0] - 1.0).abs() < 1e-6, "{:?}", contrasted[1]);
        assert!(contrasted[1][1].abs() < 1e-6, "{:?}", contrasted[1]);
    }
}
