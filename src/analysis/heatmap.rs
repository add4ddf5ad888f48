//! Plain-data attention maps and DAAM-style aggregation of cross-attention into per-word heat maps.
//!
//! The types here carry `Vec<f32>` grids with their shapes, never tensors, so the UI, the worker's
//! channel and the exporters can use them without candle. [`crate::attention::store::AttentionStore`]
//! fills them during a run.
//!
//! # Aggregation (after DAAM, castorini/daam `trace.py` / `heatmap.py`)
//! [`aggregate_token_maps`] sums each (place, resolution) group over the chosen steps, upsamples every
//! summed group map to the latent grid with bicubic interpolation, clamps it at 0, and averages the
//! groups weighted by how many layers each holds. [`word_heatmaps`] then takes the mean of a word's
//! sub-word tokens, upsamples it to the requested size (bicubic) and min-max normalises it.
//!
//! Deliberate differences from DAAM, all forced by keeping one map per (place, resolution) instead
//! of one per (layer, head), which keeps the store small enough to hold every step:
//! - Heads are averaged before upsampling, and layers of one group too; DAAM upsamples and clamps each
//!   (layer, head) map separately. Bicubic resizing is linear, so the only difference is where the
//!   clamp at 0 acts (on the averaged map here, on each head's map in DAAM). On the tiny test model,
//!   whose attention is made extra peaked, the per-token maps differ from per-head DAAM by at most 6%
//!   of the largest value (9% after min-max normalisation; `tests/analysis.rs`); smoother real attention
//!   has smaller bicubic undershoot and so a smaller difference.
//! - The steps can be restricted to a window and the places to any subset (DAAM: all steps, up + down).
//! - "Skip the 8x8 maps" is read as DAAM's rule "skip maps 8 times smaller than the latent", so it is the
//!   8x8 mid block at 512 px and adapts to other image sizes.
//! - The common grid is the largest map in the data (the latent size, 64x64 at 512 px, as in DAAM).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use crate::analysis::WordSpan;

/// Added to the per-pixel token sum before dividing (DAAM's `normalize=True` uses the same constant).
const TOKEN_NORMALIZE_EPSILON: f32 = 1e-6;
/// Added to the range in min-max normalisation (DAAM's `expand_image` uses the same constant).
const MIN_MAX_EPSILON: f32 = 1e-8;
/// DAAM skips maps whose side is this many times smaller than the latent's.
const DAAM_SKIPPED_FACTOR: usize = 8;

/// Which part of the UNet an attention layer sits in.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum UnetPlace {
    /// Encoder (down) blocks.
    Down,
    /// The middle block.
    Mid,
    /// Decoder (up) blocks.
    Up,
}

/// Cross-attention of one (place, resolution) group at one step: heads averaged, and averaged over the
/// `layer_count` layers of that place with this query grid.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CrossGroup {
    /// Down, mid or up.
    pub place: UnetPlace,
    /// Query grid height.
    pub h: usize,
    /// Query grid width.
    pub w: usize,
    /// How many layer calls were averaged into `data` (weight of this group when groups are combined).
    pub layer_count: usize,
    /// Number of text tokens kept (start token, prompt tokens, end token).
    pub token_count: usize,
    /// `[token_count, h, w]`, row-major: the attention each pixel pays to each token.
    pub data: Vec<f32>,
}

impl CrossGroup {
    /// The `[h, w]` map of one token, or `None` when `token_index >= token_count`.
    pub fn token_map(&self, token_index: usize) -> Option<&[f32]> {
        let cells = self.h * self.w;
        let start = token_index.checked_mul(cells)?;
        if token_index >= self.token_count {
            return None;
        }
        self.data.get(start..start + cells)
    }
}

/// All cross-attention kept for one denoising step.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepCross {
    /// Denoising step index, 0-based.
    pub step_index: usize,
    /// One entry per (place, resolution), sorted by place then resolution.
    pub groups: Vec<CrossGroup>,
}

/// Which steps a self-attention map covers.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum SelfAttentionSpan {
    /// Only the most recent completed step.
    #[default]
    LatestStep,
    /// The mean over every completed step.
    MeanOverSteps,
}

/// Self-attention at one resolution: heads, layers and the chosen places averaged.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SelfAttentionMap {
    /// Query grid height.
    pub h: usize,
    /// Query grid width.
    pub w: usize,
    /// Layer calls averaged into `data` (summed over steps for [`SelfAttentionSpan::MeanOverSteps`]).
    pub layer_count: usize,
    /// Steps covered.
    pub step_count: usize,
    /// `[h * w, h * w]`, row-major: row `q` is where query pixel `q = y * w + x` looks.
    pub data: Vec<f32>,
}

/// What [`aggregate_token_maps`] and [`word_heatmaps`] combine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregationSettings {
    /// Query grids `(h, w)` to use. `None`: every grid except those 8 times smaller than the latent
    /// (DAAM's rule; the 8x8 mid block at 512 px).
    pub resolutions: Option<BTreeSet<(usize, usize)>>,
    /// UNet places to use. Default: down and up (DAAM); add [`UnetPlace::Mid`] on request.
    pub places: BTreeSet<UnetPlace>,
    /// Step indices to sum over (inclusive). Default: all.
    pub steps: RangeInclusive<usize>,
    /// Divide every token's map by the per-pixel sum over the prompt tokens (not start or end),
    /// as DAAM's `normalize=True`. Default: off.
    pub normalize_tokens: bool,
}

impl Default for AggregationSettings {
    fn default() -> Self {
        Self {
            resolutions: None,
            places: [UnetPlace::Down, UnetPlace::Up].into_iter().collect(),
            steps: 0..=usize::MAX,
            normalize_tokens: false,
        }
    }
}

/// Per-token maps on a common grid, the result of [`aggregate_token_maps`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenMaps {
    /// Number of tokens (start token, prompt tokens, end token).
    pub token_count: usize,
    /// Grid height (the largest query grid in the data: the latent height).
    pub h: usize,
    /// Grid width.
    pub w: usize,
    /// `[token_count, h, w]`, not normalised: attention summed over steps, averaged over layers.
    pub data: Vec<f32>,
}

impl TokenMaps {
    /// The `[h, w]` map of one token, or `None` when out of range.
    pub fn token_map(&self, token_index: usize) -> Option<&[f32]> {
        if token_index >= self.token_count {
            return None;
        }
        let cells = self.h * self.w;
        self.data
            .get(token_index * cells..(token_index + 1) * cells)
    }

    /// `[h, w]` mean of the given tokens' maps; indices out of range are ignored.
    /// `None` when no index is in range.
    pub fn mean_map(&self, token_indices: &[usize]) -> Option<Vec<f32>> {
        let mut mean = vec![0.0f32; self.h * self.w];
        let mut used = 0usize;
        for map in token_indices
            .iter()
            .filter_map(|&index| self.token_map(index))
        {
            add_into(&mut mean, map);
            used += 1;
        }
        if used == 0 {
            return None;
        }
        let scale = 1.0 / used as f32;
        mean.iter_mut().for_each(|value| *value *= scale);
        Some(mean)
    }
}

/// A word's (or token's) heat map at output resolution.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Heatmap {
    /// The word, or `token <index>` for a single token.
    pub word: String,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `[h, w]`, min-max normalised to 0..1 (all 0 when there was nothing to show).
    pub data: Vec<f32>,
    /// Maximum of the map before normalisation (attention summed over the chosen steps), so maps of
    /// different words can be compared.
    pub peak: f32,
    /// Minimum of the map before normalisation: with [`Heatmap::peak`] it gives back the raw
    /// attention, `floor + value * (peak - floor)` (see [`Heatmap::raw_range`]).
    #[serde(default)]
    pub floor: f32,
}

impl Heatmap {
    /// `(floor, peak)`: the raw attention that `data`'s 0 and 1 stand for.
    pub fn raw_range(&self) -> (f32, f32) {
        (self.floor, self.peak)
    }
}

/// Sum of the layer maps of one group over the selected steps.
struct GroupSum {
    h: usize,
    w: usize,
    /// `Σ_steps layer_count * data`: `[tokens, h, w]`.
    sum: Vec<f32>,
    /// `Σ_steps layer_count`.
    layer_calls: usize,
    /// Steps that contributed.
    steps: usize,
}

/// Combines the chosen steps, places and resolutions into one map per token on the latent grid
/// (see the module docs for the recipe and its differences from DAAM).
///
/// Returns `None` when nothing matches the settings. Groups whose token count differs from the first
/// matching group's are skipped (a run keeps one token count throughout).
pub fn aggregate_token_maps(
    steps: &[StepCross],
    settings: &AggregationSettings,
) -> Option<TokenMaps> {
    let all_groups = || steps.iter().flat_map(|step| step.groups.iter());
    let (grid_h, grid_w) = all_groups()
        .map(|group| (group.h, group.w))
        .max_by_key(|&(h, w)| h * w)?;
    let resolution_selected = |h: usize, w: usize| match &settings.resolutions {
        Some(resolutions) => resolutions.contains(&(h, w)),
        None => {
            h.saturating_mul(DAAM_SKIPPED_FACTOR) > grid_h
                && w.saturating_mul(DAAM_SKIPPED_FACTOR) > grid_w
        }
    };

    let mut token_count = None;
    let mut sums: BTreeMap<(UnetPlace, usize, usize), GroupSum> = BTreeMap::new();
    for step in steps
        .iter()
        .filter(|step| settings.steps.contains(&step.step_index))
    {
        for group in &step.groups {
            if !settings.places.contains(&group.place) || !resolution_selected(group.h, group.w) {
                continue;
            }
            let expected_len = group.token_count * group.h * group.w;
            if group.data.len() != expected_len || group.layer_count == 0 {
                continue;
            }
            if *token_count.get_or_insert(group.token_count) != group.token_count {
                continue;
            }
            let entry = sums
                .entry((group.place, group.h, group.w))
                .or_insert_with(|| GroupSum {
                    h: group.h,
                    w: group.w,
                    sum: vec![0.0; expected_len],
                    layer_calls: 0,
                    steps: 0,
                });
            let weight = group.layer_count as f32;
            entry
                .sum
                .iter_mut()
                .zip(&group.data)
                .for_each(|(sum, value)| *sum += weight * value);
            entry.layer_calls += group.layer_count;
            entry.steps += 1;
        }
    }
    let token_count = token_count?;

    let cells = grid_h * grid_w;
    let mut data = vec![0.0f32; token_count * cells];
    let mut layer_total = 0.0f32;
    for group in sums.values() {
        let group_cells = group.h * group.w;
        for (token, out) in data.chunks_exact_mut(cells).enumerate() {
            let Some(map) = group
                .sum
                .get(token * group_cells..(token + 1) * group_cells)
            else {
                continue;
            };
            let mut upsampled = resize_bicubic(map, group.h, group.w, grid_h, grid_w);
            upsampled
                .iter_mut()
                .for_each(|value| *value = value.max(0.0));
            add_into(out, &upsampled);
        }
        // Layers per step of this group: the weight of its (step-summed) map in the layer average.
        layer_total += group.layer_calls as f32 / group.steps as f32;
    }
    if layer_total <= 0.0 {
        return None;
    }
    let scale = 1.0 / layer_total;
    data.iter_mut().for_each(|value| *value *= scale);

    if settings.normalize_tokens && token_count >= 3 {
        normalize_over_prompt_tokens(&mut data, token_count, cells);
    }
    Some(TokenMaps {
        token_count,
        h: grid_h,
        w: grid_w,
        data,
    })
}

/// DAAM's `normalize=True`: divide every token's map by the per-pixel sum over the prompt tokens
/// `1..token_count - 1` (start and end token excluded).
fn normalize_over_prompt_tokens(data: &mut [f32], token_count: usize, cells: usize) {
    let mut prompt_sum = vec![0.0f32; cells];
    for map in data.chunks_exact(cells).take(token_count - 1).skip(1) {
        add_into(&mut prompt_sum, map);
    }
    for map in data.chunks_exact_mut(cells) {
        map.iter_mut()
            .zip(&prompt_sum)
            .for_each(|(value, sum)| *value /= sum + TOKEN_NORMALIZE_EPSILON);
    }
}

/// One heat map per word, `out_h x out_w`, in the order of `words` (DAAM's word heat maps; see the
/// module docs). A word's map is the mean of its tokens' maps (indices beyond the kept tokens are
/// ignored), upsampled bicubically and min-max normalised; [`Heatmap::peak`] keeps its raw maximum.
/// Words with no usable token, or settings that match no data, give all-zero maps with peak 0.
pub fn word_heatmaps(
    steps: &[StepCross],
    words: &[WordSpan],
    settings: &AggregationSettings,
    out_h: usize,
    out_w: usize,
) -> Vec<Heatmap> {
    let token_maps = aggregate_token_maps(steps, settings);
    words
        .iter()
        .map(|word| {
            heatmap_from_tokens(
                token_maps.as_ref(),
                &word.text,
                &word.token_indices,
                out_h,
                out_w,
            )
        })
        .collect()
}

/// The heat map of a single token (index into the token sequence, start token = 0), labelled
/// `token <index>`. `None` when the token is not kept or the settings match no data.
pub fn token_heatmap(
    steps: &[StepCross],
    token_index: usize,
    settings: &AggregationSettings,
    out_h: usize,
    out_w: usize,
) -> Option<Heatmap> {
    let token_maps = aggregate_token_maps(steps, settings)?;
    token_maps.token_map(token_index)?;
    Some(heatmap_from_tokens(
        Some(&token_maps),
        &format!("token {token_index}"),
        &[token_index],
        out_h,
        out_w,
    ))
}

/// Mean of the tokens' maps, upsampled to `out_h x out_w`, min-max normalised.
fn heatmap_from_tokens(
    token_maps: Option<&TokenMaps>,
    label: &str,
    token_indices: &[usize],
    out_h: usize,
    out_w: usize,
) -> Heatmap {
    let empty = || Heatmap {
        word: label.to_string(),
        h: out_h,
        w: out_w,
        data: vec![0.0; out_h * out_w],
        peak: 0.0,
        floor: 0.0,
    };
    let Some(token_maps) = token_maps else {
        return empty();
    };
    let Some(mean) = token_maps.mean_map(token_indices) else {
        return empty();
    };
    let mut data = resize_bicubic(&mean, token_maps.h, token_maps.w, out_h, out_w);
    let (floor, peak) = min_max_normalize(&mut data).unwrap_or((0.0, 0.0));
    Heatmap {
        word: label.to_string(),
        h: out_h,
        w: out_w,
        data,
        peak,
        floor,
    }
}

/// Scales `data` to 0..1 in place with `(x - min) / (max - min + 1e-8)` (DAAM's `expand_image`).
/// Returns the `(min, max)` it found, `None` for empty data.
pub fn min_max_normalize(data: &mut [f32]) -> Option<(f32, f32)> {
    let (min, max) = data
        .iter()
        .fold(None, |range: Option<(f32, f32)>, &value| match range {
            None => Some((value, value)),
            Some((min, max)) => Some((min.min(value), max.max(value))),
        })?;
    let scale = 1.0 / (max - min + MIN_MAX_EPSILON);
    data.iter_mut()
        .for_each(|value| *value = (*value - min) * scale);
    Some((min, max))
}

/// The self-attention probe: where query pixel `(pixel_y, pixel_x)` looks, as an `[h, w]` map (row
/// `pixel_y * w + pixel_x` of the `[h * w, h * w]` matrix `self_map`). Coordinates past the edge are
/// clamped to it. Returns an empty `Vec` when `self_map` is not `(h * w)²` long or the grid is empty.
pub fn self_attention_probe(
    self_map: &[f32],
    h: usize,
    w: usize,
    pixel_y: usize,
    pixel_x: usize,
) -> Vec<f32> {
    let cells = h * w;
    if cells == 0 || self_map.len() != cells * cells {
        return Vec::new();
    }
    let query = pixel_y.min(h - 1) * w + pixel_x.min(w - 1);
    self_map[query * cells..(query + 1) * cells].to_vec()
}

/// Element-wise `target += source` over the common length.
fn add_into(target: &mut [f32], source: &[f32]) {
    target
        .iter_mut()
        .zip(source)
        .for_each(|(sum, value)| *sum += value);
}

// ---------------------------------------------------------------------------------------------
// Resizing `[h, w]` grids. All three follow PyTorch's `F.interpolate` with `align_corners=False`, so
// maps match those of DAAM and Prompt-to-Prompt. A `src` shorter than `h * w` reads missing cells as 0.
// ---------------------------------------------------------------------------------------------

/// PyTorch's cubic convolution constant (Keys' `a`) for `mode="bicubic"`.
const BICUBIC_A: f32 = -0.75;

/// One output coordinate of a separable resize: source indices and their weights.
struct Taps<const N: usize> {
    indices: [usize; N],
    weights: [f32; N],
}

/// Resizes `src` `[h, w]` to `[out_h, out_w]` with bicubic interpolation (PyTorch `mode="bicubic"`,
/// `align_corners=False`, `a = -0.75`, edge pixels repeated). Can undershoot below the input's
/// minimum near sharp edges; callers clamp where it matters.
pub fn resize_bicubic(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    resize_separable(src, h, w, out_h, out_w, bicubic_taps)
}

/// Resizes `src` `[h, w]` to `[out_h, out_w]` with bilinear interpolation (PyTorch `mode="bilinear"`,
/// `align_corners=False`).
pub fn resize_bilinear(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    resize_separable(src, h, w, out_h, out_w, bilinear_taps)
}

/// Resizes `src` `[h, w]` to `[out_h, out_w]` by nearest neighbour (PyTorch `mode="nearest"`:
/// source index `floor(dst * in / out)`).
pub fn resize_nearest(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    resize_separable(src, h, w, out_h, out_w, nearest_taps)
}

/// Applies a 1D resampling kernel along the width, then along the height.
fn resize_separable<const N: usize>(
    src: &[f32],
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    taps_for: fn(usize, usize, usize) -> Taps<N>,
) -> Vec<f32> {
    if h == 0 || w == 0 {
        return vec![0.0; out_h * out_w];
    }
    let read = |y: usize, x: usize| src.get(y * w + x).copied().unwrap_or(0.0);
    let column_taps: Vec<Taps<N>> = (0..out_w).map(|x| taps_for(x, w, out_w)).collect();
    let mut rows_resized = vec![0.0f32; h * out_w];
    for y in 0..h {
        for (x, taps) in column_taps.iter().enumerate() {
            rows_resized[y * out_w + x] = taps
                .indices
                .iter()
                .zip(&taps.weights)
                .map(|(&index, &weight)| weight * read(y, index))
                .sum();
        }
    }
    let mut out = vec![0.0f32; out_h * out_w];
    for y in 0..out_h {
        let taps = taps_for(y, h, out_h);
        let out_row = &mut out[y * out_w..(y + 1) * out_w];
        for (&index, &weight) in taps.indices.iter().zip(&taps.weights) {
            let source_row = &rows_resized[index * out_w..(index + 1) * out_w];
            out_row
                .iter_mut()
                .zip(source_row)
                .for_each(|(out, value)| *out += weight * value);
        }
    }
    out
}

/// Source coordinate of output index `dst` for `align_corners=False`.
fn source_coordinate(dst: usize, in_size: usize, out_size: usize) -> f32 {
    let scale = in_size as f32 / out_size as f32;
    scale * (dst as f32 + 0.5) - 0.5
}

fn bicubic_taps(dst: usize, in_size: usize, out_size: usize) -> Taps<4> {
    let real = source_coordinate(dst, in_size, out_size);
    let floor = real.floor();
    let t = real - floor;
    let last = in_size as i64 - 1;
    let base = floor as i64;
    let index = |offset: i64| (base + offset).clamp(0, last) as usize;
    let near = |x: f32| ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1.0;
    let far =
        |x: f32| ((BICUBIC_A * x - 5.0 * BICUBIC_A) * x + 8.0 * BICUBIC_A) * x - 4.0 * BICUBIC_A;
    Taps {
        indices: [index(-1), index(0), index(1), index(2)],
        weights: [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)],
    }
}

fn bilinear_taps(dst: usize, in_size: usize, out_size: usize) -> Taps<2> {
    let real = source_coordinate(dst, in_size, out_size).max(0.0);
    let low = (real as usize).min(in_size - 1);
    let high = (low + 1).min(in_size - 1);
    let fraction = real - low as f32;
    Taps {
        indices: [low, high],
        weights: [1.0 - fraction, fraction],
    }
}

fn nearest_taps(dst: usize, in_size: usize, out_size: usize) -> Taps<1> {
    let scale = in_size as f32 / out_size as f32;
    let index = ((dst as f32 * scale).floor() as usize).min(in_size - 1);
    Taps {
        indices: [index],
        weights: [1.0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TORCH_INPUT: [f32; 6] = [0.0, 1.0, 4.0, 2.0, -1.0, 3.0];

    fn max_abs_diff(actual: &[f32], expected: &[f32]) -> f32 {
        assert_eq!(actual.len(), expected.len());
        actual
            .iter()
            .zip(expected)
            .map(|(a, e)| (a - e).abs())
            .fold(0.0, f32::max)
    }

    /// Expected values: `torch.nn.functional.interpolate` (torch, CPU tensors)
    /// of `[[0, 1, 4], [2, -1, 3]]` to 5x7, and of `arange(35).view(5, 7)` to 2x3.
    #[test]
    fn resizing_matches_pytorch_interpolate() {
        let bicubic_up = [
            -0.378_042_85,
            -0.084_061_09,
            0.312_235_2,
            1.220_499_8,
            2.584_930_2,
            3.779_520_3,
            4.426_186,
            0.090_531_22,
            0.204_874_2,
            0.230_402_7,
            0.835_999_8,
            2.200_430_9,
            3.553_921,
            4.254_954,
            1.109_329_2,
            0.833_092_3,
            0.052_478_194,
            0.0,
            1.364_430_8,
            3.063_411,
            3.882_653_5,
            2.128_128_3,
            1.461_311,
            -0.125_446_5,
            -0.836_000_6,
            0.528_430_2,
            2.572_900_3,
            3.510_352_4,
            2.596_702_3,
            1.750_246_3,
            -0.207_278_9,
            -1.220_500_2,
            0.143_931_2,
            2.347_302_4,
            3.339_122_8,
        ];
        let bilinear_up = [
            0.0,
            0.142_857_15,
            0.571_428_6,
            1.0,
            2.285_714_4,
            3.571_428_8,
            4.0,
            0.2,
            0.285_714_3,
            0.542_857_2,
            0.8,
            2.128_571_3,
            3.457_142_8,
            3.9,
            1.0,
            0.857_142_87,
            0.428_571_43,
            0.0,
            1.5,
            3.0,
            3.5,
            1.8,
            1.428_571_5,
            0.314_285_7,
            -0.8,
            0.871_428_6,
            2.542_857_4,
            3.1,
            2.0,
            1.571_428_5,
            0.285_714_2,
            -1.0,
            0.714_285_8,
            2.428_571_7,
            3.0,
        ];
        let nearest_up = [
            0.0, 0.0, 0.0, 1.0, 1.0, 4.0, 4.0, 0.0, 0.0, 0.0, 1.0, 1.0, 4.0, 4.0, 0.0, 0.0, 0.0,
            1.0, 1.0, 4.0, 4.0, 2.0, 2.0, 2.0, -1.0, -1.0, 3.0, 3.0, 2.0, 2.0, 2.0, -1.0, -1.0,
            3.0, 3.0,
        ];
        let ramp: Vec<f32> = (0..35).map(|value| value as f32).collect();
        let checks = [
            (
                "bicubic up",
                max_abs_diff(&resize_bicubic(&TORCH_INPUT, 2, 3, 5, 7), &bicubic_up),
            ),
            (
                "bilinear up",
                max_abs_diff(&resize_bilinear(&TORCH_INPUT, 2, 3, 5, 7), &bilinear_up),
            ),
            (
                "nearest up",
                max_abs_diff(&resize_nearest(&TORCH_INPUT, 2, 3, 5, 7), &nearest_up),
            ),
            (
                "bicubic down",
                max_abs_diff(
                    &resize_bicubic(&ramp, 5, 7, 2, 3),
                    &[
                        5.249_853_6,
                        7.675_781_3,
                        10.101_707,
                        23.898_287,
                        26.324_219,
                        28.750_147,
                    ],
                ),
            ),
            (
                "bilinear down",
                max_abs_diff(
                    &resize_bilinear(&ramp, 5, 7, 2, 3),
                    &[5.916_666_5, 8.25, 10.583_333, 23.416_668, 25.75, 28.083_332],
                ),
            ),
            (
                "nearest down",
                max_abs_diff(
                    &resize_nearest(&ramp, 5, 7, 2, 3),
                    &[0.0, 2.0, 4.0, 14.0, 16.0, 18.0],
                ),
            ),
        ];
        for (name, diff) in checks {
            eprintln!("{name}: max abs diff vs PyTorch {diff:e}");
            assert!(diff < 1e-4, "{name}: {diff}");
        }
        // Same size is the identity for every mode.
        assert_eq!(
            resize_bicubic(&TORCH_INPUT, 2, 3, 2, 3),
            TORCH_INPUT.to_vec()
        );
        assert_eq!(
            resize_bilinear(&TORCH_INPUT, 2, 3, 2, 3),
            TORCH_INPUT.to_vec()
        );
    }

    /// `[tokens, side, side]` where `token_peaks[t]` is the `(y, x)` of token t's single 1.0 (others
    /// 0.01), `None` for a flat 0.01 map.
    fn peaked_group(
        place: UnetPlace,
        side: usize,
        layer_count: usize,
        token_peaks: &[Option<(usize, usize)>],
    ) -> CrossGroup {
        let mut data = vec![0.01f32; token_peaks.len() * side * side];
        for (token, peak) in token_peaks.iter().enumerate() {
            if let Some((y, x)) = peak {
                data[token * side * side + y * side + x] = 1.0;
            }
        }
        CrossGroup {
            place,
            h: side,
            w: side,
            layer_count,
            token_count: token_peaks.len(),
            data,
        }
    }

    fn argmax(heatmap: &Heatmap) -> (usize, usize) {
        let index = heatmap
            .data
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(index, _)| index)
            .unwrap();
        (index / heatmap.w, index % heatmap.w)
    }

    fn word(text: &str, token_indices: &[usize]) -> WordSpan {
        WordSpan {
            text: text.to_string(),
            token_indices: token_indices.to_vec(),
        }
    }

    const TOP_LEFT: Option<(usize, usize)> = Some((0, 0));
    const BOTTOM_RIGHT_8: Option<(usize, usize)> = Some((7, 7));
    const BOTTOM_RIGHT_4: Option<(usize, usize)> = Some((3, 3));

    #[test]
    fn corner_peak_gives_heatmap_peaking_there() {
        let steps = vec![StepCross {
            step_index: 0,
            groups: vec![
                peaked_group(UnetPlace::Down, 8, 2, &[None, TOP_LEFT, None]),
                peaked_group(UnetPlace::Up, 4, 3, &[None, TOP_LEFT, None]),
            ],
        }];
        let maps = word_heatmaps(
            &steps,
            &[word("cat", &[1])],
            &AggregationSettings::default(),
            32,
            32,
        );
        assert_eq!(maps.len(), 1);
        let (y, x) = argmax(&maps[0]);
        assert!(y < 4 && x < 4, "peak at {y},{x}");
        assert!((maps[0].data.iter().cloned().fold(f32::MIN, f32::max) - 1.0).abs() < 1e-6);
        assert!(maps[0].peak > 0.0);
    }

    #[test]
    fn step_window_and_place_filter_select_their_maps() {
        let steps: Vec<StepCross> = (0..4)
            .map(|step_index| {
                let (down_peak, up_peak) = if step_index < 2 {
                    (TOP_LEFT, TOP_LEFT)
                } else {
                    (BOTTOM_RIGHT_8, BOTTOM_RIGHT_4)
                };
                let up_peak = if step_index == 3 { TOP_LEFT } else { up_peak };
                StepCross {
                    step_index,
                    groups: vec![
                        peaked_group(UnetPlace::Down, 8, 2, &[None, down_peak, None]),
                        peaked_group(UnetPlace::Up, 4, 3, &[None, up_peak, None]),
                    ],
                }
            })
            .collect();
        let words = [word("cat", &[1])];
        let peak_with = |settings: &AggregationSettings| {
            argmax(&word_heatmaps(&steps, &words, settings, 16, 16)[0])
        };
        let early = AggregationSettings {
            steps: 0..=1,
            ..AggregationSettings::default()
        };
        let late = AggregationSettings {
            steps: 2..=2,
            ..AggregationSettings::default()
        };
        let (y, x) = peak_with(&early);
        assert!(y < 3 && x < 3, "early steps peak at {y},{x}");
        let (y, x) = peak_with(&late);
        assert!(y > 12 && x > 12, "late step peaks at {y},{x}");

        // Step 3: down still bottom-right, up back at top-left.
        let step3 = |places: &[UnetPlace]| AggregationSettings {
            steps: 3..=3,
            places: places.iter().copied().collect(),
            ..AggregationSettings::default()
        };
        let (y, x) = peak_with(&step3(&[UnetPlace::Down]));
        assert!(y > 12 && x > 12, "down only peaks at {y},{x}");
        let (y, x) = peak_with(&step3(&[UnetPlace::Up]));
        assert!(y < 3 && x < 3, "up only peaks at {y},{x}");
        // No mid maps were stored: nothing to show.
        let mid_only = word_heatmaps(&steps, &words, &step3(&[UnetPlace::Mid]), 16, 16);
        assert!(mid_only[0].data.iter().all(|&value| value == 0.0) && mid_only[0].peak == 0.0);
    }

    #[test]
    fn word_is_the_mean_of_its_tokens_and_groups_weigh_by_layers() {
        // One resolution (2x2) so no resizing blurs the arithmetic.
        let group = |place, layer_count, token_values: [[f32; 4]; 4]| CrossGroup {
            place,
            h: 2,
            w: 2,
            layer_count,
            token_count: 4,
            data: token_values.concat(),
        };
        let down = group(
            UnetPlace::Down,
            3,
            [
                [0.0; 4],
                [1.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.5],
                [0.0; 4],
            ],
        );
        let up = group(
            UnetPlace::Up,
            1,
            [
                [0.0; 4],
                [0.0, 0.0, 0.0, 1.0],
                [0.0, 0.0, 0.0, 0.5],
                [0.0; 4],
            ],
        );
        let steps = vec![StepCross {
            step_index: 0,
            groups: vec![down, up],
        }];
        let settings = AggregationSettings::default();
        let maps = aggregate_token_maps(&steps, &settings).unwrap();
        assert_eq!((maps.token_count, maps.h, maps.w), (4, 2, 2));
        // Token 1: (3 * [1,0,0,0] + [0,0,0,1]) / 4.
        assert_eq!(maps.token_map(1).unwrap(), &[0.75, 0.0, 0.0, 0.25]);
        assert_eq!(maps.token_map(2).unwrap(), &[0.0, 0.0, 0.0, 0.5]);

        let heatmaps = word_heatmaps(
            &steps,
            &[word("sunglasses", &[1, 2]), word("gone", &[9])],
            &settings,
            2,
            2,
        );
        let expected_raw = [0.375f32, 0.0, 0.0, 0.375];
        assert!((heatmaps[0].peak - 0.375).abs() < 1e-6);
        let expected: Vec<f32> = expected_raw
            .iter()
            .map(|value| value / (0.375 + MIN_MAX_EPSILON))
            .collect();
        let diff = max_abs_diff(&heatmaps[0].data, &expected);
        eprintln!("sub-word mean max abs diff {diff:e}");
        assert!(diff < 1e-6);
        assert!(heatmaps[1].data.iter().all(|&value| value == 0.0));

        let single = token_heatmap(&steps, 2, &settings, 2, 2).unwrap();
        assert_eq!(single.word, "token 2");
        assert!((single.peak - 0.5).abs() < 1e-6);
        assert!(token_heatmap(&steps, 4, &settings, 2, 2).is_none());
    }

    #[test]
    fn default_resolutions_skip_maps_eight_times_smaller_and_tokens_normalise() {
        let steps = vec![StepCross {
            step_index: 0,
            groups: vec![
                peaked_group(
                    UnetPlace::Down,
                    8,
                    1,
                    &[None, TOP_LEFT, BOTTOM_RIGHT_8, None],
                ),
                CrossGroup {
                    place: UnetPlace::Up,
                    h: 1,
                    w: 1,
                    layer_count: 1,
                    token_count: 4,
                    data: vec![0.0, 100.0, 0.0, 0.0],
                },
            ],
        }];
        let default_maps = aggregate_token_maps(&steps, &AggregationSettings::default()).unwrap();
        assert!(
            default_maps
                .token_map(1)
                .unwrap()
                .iter()
                .all(|&value| value <= 1.0 + 1e-5),
            "1x1 map was used"
        );
        let with_1x1 = AggregationSettings {
            resolutions: Some([(1, 1), (8, 8)].into_iter().collect()),
            ..AggregationSettings::default()
        };
        let all_maps = aggregate_token_maps(&steps, &with_1x1).unwrap();
        assert!(all_maps
            .token_map(1)
            .unwrap()
            .iter()
            .all(|&value| value > 10.0));

        let normalized = AggregationSettings {
            normalize_tokens: true,
            ..AggregationSettings::default()
        };
        let maps = aggregate_token_maps(&steps, &normalized).unwrap();
        for pixel in 0..64 {
            let prompt_sum = maps.data[64 + pixel] + maps.data[2 * 64 + pixel];
            assert!(
                (prompt_sum - 1.0).abs() < 1e-4,
                "pixel {pixel}: {prompt_sum}"
            );
        }
    }

    #[test]
    fn probe_and_normalise() {
        // 2x2 grid: query q looks only at key (3 - q).
        let mut self_map = vec![0.0f32; 16];
        for query in 0..4 {
            self_map[query * 4 + (3 - query)] = 1.0;
        }
        assert_eq!(
            self_attention_probe(&self_map, 2, 2, 0, 1),
            vec![0.0, 0.0, 1.0, 0.0]
        );
        assert_eq!(
            self_attention_probe(&self_map, 2, 2, 9, 9),
            vec![1.0, 0.0, 0.0, 0.0]
        );
        assert!(self_attention_probe(&self_map[..15], 2, 2, 0, 0).is_empty());

        let mut data = vec![2.0f32, 4.0, 3.0];
        assert_eq!(min_max_normalize(&mut data), Some((2.0, 4.0)));
        assert!((data[2] - 0.5).abs() < 1e-6 && data[0] == 0.0);
        assert_eq!(min_max_normalize(&mut []), None);
        assert!(aggregate_token_maps(&[], &AggregationSettings::default()).is_none());
    }
}
