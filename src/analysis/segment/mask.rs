//! Masks from selected segments at image resolution: the segments' indicator is upsampled
//! bilinearly and thresholded, then optionally grown (or shrunk) and feathered by a number of pixels,
//! both measured with an exact Euclidean distance transform.

use super::Segmentation;
use crate::analysis::heatmap::resize_bilinear;

/// Stand-in for "no feature pixel on this line" in the distance transform.
const FAR_AWAY: f64 = 1e20;

/// How [`segments_mask`] turns segments into a mask.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaskSettings {
    /// A pixel is in the mask when the upsampled indicator is at least this. Default 0.5.
    pub threshold: f32,
    /// Grow the mask by this many pixels (Euclidean); negative values shrink it. Default 0.
    pub dilate_px: i32,
    /// Width in pixels of a linear ramp across the edge (half inside, half outside, 0.5 on the
    /// edge); 0 keeps a hard 0/1 edge. Default 0.
    pub feather_px: f32,
}

impl Default for MaskSettings {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            dilate_px: 0,
            feather_px: 0.0,
        }
    }
}

/// A soft mask at image resolution.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mask {
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `[h, w]`, row-major, 0..1 (exactly 0 or 1 unless feathered).
    pub data: Vec<f32>,
}

impl Mask {
    /// Pixels with a value of at least 0.5.
    pub fn covered_pixels(&self) -> usize {
        self.data.iter().filter(|&&value| value >= 0.5).count()
    }

    /// `[h, w]` 8-bit grey levels (0 black = outside, 255 white = inside).
    pub fn to_grey8(&self) -> Vec<u8> {
        self.data
            .iter()
            .map(|&value| (value.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    /// `[h, w]`: true where the value is at least 0.5.
    pub fn to_binary(&self) -> Vec<bool> {
        self.data.iter().map(|&value| value >= 0.5).collect()
    }
}

/// The mask of the union of `segment_ids` at `out_h x out_w` (see the module docs). Unknown ids are
/// ignored; no id gives an empty mask.
pub fn segments_mask(
    segmentation: &Segmentation,
    segment_ids: &[usize],
    out_h: usize,
    out_w: usize,
    settings: &MaskSettings,
) -> Mask {
    let indicator = segmentation.indicator(segment_ids);
    let upsampled = resize_bilinear(&indicator, segmentation.h, segmentation.w, out_h, out_w);
    let binary: Vec<bool> = upsampled
        .iter()
        .map(|&value| value >= settings.threshold)
        .collect();
    binary_mask_to_mask(
        &binary,
        out_h,
        out_w,
        settings.dilate_px,
        settings.feather_px,
    )
}

/// Grows (or shrinks, for negative `dilate_px`) a binary `[h, w]` mask and feathers its edge over
/// `feather_px` pixels. Growing adds the pixels within `dilate_px` pixels (centre to centre,
/// Euclidean) of the mask; shrinking removes the pixels within `-dilate_px` pixels of the outside.
/// A `binary` shorter than `h * w` counts the missing pixels as outside.
pub fn binary_mask_to_mask(
    binary: &[bool],
    h: usize,
    w: usize,
    dilate_px: i32,
    feather_px: f32,
) -> Mask {
    let mut inside: Vec<bool> = (0..h * w)
        .map(|index| binary.get(index).copied().unwrap_or(false))
        .collect();
    if dilate_px > 0 {
        let to_mask = squared_distance_transform(h, w, |index| inside[index]);
        let reach = f64::from(dilate_px).powi(2);
        inside = to_mask.iter().map(|&distance| distance <= reach).collect();
    } else if dilate_px < 0 {
        let to_outside = squared_distance_transform(h, w, |index| !inside[index]);
        let reach = f64::from(dilate_px).powi(2);
        inside = inside
            .iter()
            .zip(&to_outside)
            .map(|(&is_inside, &distance)| is_inside && distance > reach)
            .collect();
    }
    let feather_px = if feather_px.is_finite() {
        feather_px.max(0.0)
    } else {
        0.0
    };
    if feather_px == 0.0 {
        return Mask {
            h,
            w,
            data: inside
                .iter()
                .map(|&is_inside| if is_inside { 1.0 } else { 0.0 })
                .collect(),
        };
    }
    // Signed distance to the edge: negative inside, positive outside, ±0.5 on the pixels next to it.
    let to_mask = squared_distance_transform(h, w, |index| inside[index]);
    let to_outside = squared_distance_transform(h, w, |index| !inside[index]);
    let data = (0..h * w)
        .map(|index| {
            let signed = if inside[index] {
                0.5 - to_outside[index].sqrt()
            } else {
                to_mask[index].sqrt() - 0.5
            };
            (0.5 - signed / f64::from(feather_px)).clamp(0.0, 1.0) as f32
        })
        .collect();
    Mask { h, w, data }
}

/// `[h, w]`: squared Euclidean distance from every pixel to the nearest pixel where `is_feature`
/// holds (0 on them; about 1e20 when there is none). Separable exact transform: columns, then rows,
/// each the lower envelope of parabolas rooted at the feature distances.
fn squared_distance_transform(h: usize, w: usize, is_feature: impl Fn(usize) -> bool) -> Vec<f64> {
    let mut grid: Vec<f64> = (0..h * w)
        .map(|index| if is_feature(index) { 0.0 } else { FAR_AWAY })
        .collect();
    let longest = h.max(w);
    let mut line = vec![0.0f64; longest];
    let mut result = vec![0.0f64; longest];
    let mut scratch = EnvelopeScratch::new(longest);
    for x in 0..w {
        for y in 0..h {
            line[y] = grid[y * w + x];
        }
        lower_envelope(&line[..h], &mut result[..h], &mut scratch);
        for y in 0..h {
            grid[y * w + x] = result[y];
        }
    }
    for y in 0..h {
        line[..w].copy_from_slice(&grid[y * w..(y + 1) * w]);
        lower_envelope(&line[..w], &mut result[..w], &mut scratch);
        grid[y * w..(y + 1) * w].copy_from_slice(&result[..w]);
    }
    grid
}

/// Buffers of [`lower_envelope`]: the roots of the parabolas kept and where each starts to win.
struct EnvelopeScratch {
    roots: Vec<usize>,
    boundaries: Vec<f64>,
}

impl EnvelopeScratch {
    fn new(length: usize) -> Self {
        Self {
            roots: vec![0; length],
            boundaries: vec![0.0; length + 1],
        }
    }
}

/// 1D squared distance transform: `out[q] = min_p (q - p)² + costs[p]`, computed as the lower
/// envelope of the parabolas `(q - p)² + costs[p]`.
fn lower_envelope(costs: &[f64], out: &mut [f64], scratch: &mut EnvelopeScratch) {
    let length = costs.len();
    if length == 0 {
        return;
    }
    let roots = &mut scratch.roots;
    let boundaries = &mut scratch.boundaries;
    let height = |p: usize| costs[p] + (p * p) as f64;
    // Where the parabola rooted at `q` starts to lie below the one rooted at `p` (p < q).
    let crossing = |p: usize, q: usize| (height(q) - height(p)) / (2.0 * (q - p) as f64);
    let mut last = 0usize;
    roots[0] = 0;
    boundaries[0] = f64::NEG_INFINITY;
    boundaries[1] = f64::INFINITY;
    for q in 1..length {
        let mut start = crossing(roots[last], q);
        // The first boundary is -inf, so the first parabola is never removed.
        while last > 0 && start <= boundaries[last] {
            last -= 1;
            start = crossing(roots[last], q);
        }
        last += 1;
        roots[last] = q;
        boundaries[last] = start;
        boundaries[last + 1] = f64::INFINITY;
    }
    let mut segment = 0usize;
    for (q, value) in out.iter_mut().enumerate() {
        while boundaries[segment + 1] < q as f64 {
            segment += 1;
        }
        let offset = q as f64 - roots[segment] as f64;
        *value = offset * offset + costs[roots[segment]];
    }
}
