//! Local blend: the mask from the chosen words' cross-attention maps, and its application to the
//! latents.

use candle_core::Tensor;

use crate::analysis::edit_spec::BlendMask;
use crate::analysis::heatmap::resize_nearest;
use crate::pipeline::{PipelineError, PipelineResult};

/// The local blend's word maps of one prompt at one grid: means over heads, layers and the steps so
/// far.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlendWordMaps {
    /// Grid rows.
    pub h: usize,
    /// Grid columns.
    pub w: usize,
    /// `[h, w]`: the blend words' attention summed over their tokens.
    pub words: Vec<f32>,
    /// `[h, w]`: the subtract-words' attention summed over their tokens (zeros without any).
    pub subtract_words: Vec<f32>,
}

/// The local-blend mask (see the module docs): per prompt, the words' map max-pooled 3x3, resized to
/// `latent_h x latent_w` (nearest), divided by its maximum and compared with `threshold`; the two
/// prompts' masks are united; when `subtract_threshold` is given, the subtract-words' maps (not
/// pooled, same normalisation) are united likewise and removed. A prompt whose map is all zero
/// contributes nothing.
pub fn local_blend_mask(
    source: &BlendWordMaps,
    edit: &BlendWordMaps,
    latent_h: usize,
    latent_w: usize,
    threshold: f32,
    subtract_threshold: Option<f32>,
) -> BlendMask {
    let cells = latent_h * latent_w;
    let region = |maps: &BlendWordMaps, data: &[f32], pool: bool, threshold: f32| -> Vec<bool> {
        if data.len() != maps.h * maps.w || data.is_empty() {
            return vec![false; cells];
        }
        let pooled = if pool {
            max_pool_3x3(data, maps.h, maps.w)
        } else {
            data.to_vec()
        };
        let resized = resize_nearest(&pooled, maps.h, maps.w, latent_h, latent_w);
        let max = resized.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max.is_nan() || max <= 0.0 {
            return vec![false; cells];
        }
        resized
            .iter()
            .map(|&value| value / max > threshold)
            .collect()
    };
    let mut mask: Vec<bool> = region(source, &source.words, true, threshold)
        .into_iter()
        .zip(region(edit, &edit.words, true, threshold))
        .map(|(in_source, in_edit)| in_source || in_edit)
        .collect();
    if let Some(subtract_threshold) = subtract_threshold {
        let source_sub = region(source, &source.subtract_words, false, subtract_threshold);
        let edit_sub = region(edit, &edit.subtract_words, false, subtract_threshold);
        for ((keep, in_source), in_edit) in mask.iter_mut().zip(source_sub).zip(edit_sub) {
            *keep = *keep && !(in_source || in_edit);
        }
    }
    BlendMask {
        h: latent_h,
        w: latent_w,
        data: mask
            .into_iter()
            .map(|inside| if inside { 1.0 } else { 0.0 })
            .collect(),
    }
}

/// 3x3 max-pool with stride 1; cells outside the grid are ignored (PyTorch pads with -inf).
fn max_pool_3x3(data: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![f32::NEG_INFINITY; h * w];
    for y in 0..h {
        for x in 0..w {
            let mut best = f32::NEG_INFINITY;
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    best = best.max(data[ny * w + nx]);
                }
            }
            out[y * w + x] = best;
        }
    }
    out
}

/// `x_src + mask * (x_edit - x_src)`: `source` and `edit` `[1, channels, h, w]`, `mask` `[h, w]`
/// (broadcast over channels). Cells inside the mask take the edited latent, the others the source's,
/// both exactly.
pub fn blend_latents(source: &Tensor, edit: &Tensor, mask: &BlendMask) -> PipelineResult<Tensor> {
    let (_, _, h, w) = edit.dims4()?;
    if (mask.h, mask.w) != (h, w) || mask.data.len() != h * w {
        return Err(PipelineError::InvalidArgument {
            name: "local blend mask",
            reason: format!(
                "mask is {}x{} with {} values, latents are {h}x{w}",
                mask.h,
                mask.w,
                mask.data.len()
            ),
        });
    }
    if source.dims() != edit.dims() {
        return Err(PipelineError::InvalidArgument {
            name: "local blend latents",
            reason: format!(
                "source latents {:?} and edited latents {:?} differ in shape",
                source.dims(),
                edit.dims()
            ),
        });
    }
    // The mask is 0/1, so the blend is a selection; selecting keeps both sides bit-exact.
    let inside: Vec<u8> = mask
        .data
        .iter()
        .map(|&value| u8::from(value > 0.5))
        .collect();
    let inside = Tensor::from_vec(inside, (1, 1, h, w), edit.device())?
        .broadcast_as(edit.shape())?
        .contiguous()?;
    Ok(inside.where_cond(edit, source)?)
}

/// The grid to build the blend mask from: the configured side, else the one nearest a quarter of the
/// latent side (ties: the larger grid).
pub(super) fn choose_grid<'a>(
    grids: impl Iterator<Item = &'a (usize, usize)>,
    map_side: Option<usize>,
    latent_h: usize,
    latent_w: usize,
) -> Option<&'a (usize, usize)> {
    let target = map_side.unwrap_or(latent_h.max(latent_w) / 4).max(1);
    grids.min_by_key(|&&(h, w)| {
        let side = h.max(w);
        (side.abs_diff(target), std::cmp::Reverse(side))
    })
}
