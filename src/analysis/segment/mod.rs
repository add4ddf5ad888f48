//! Self-attention segmentation labelled by cross-attention: cluster the image into segments from where
//! its pixels look (self-attention), name each segment with the prompt word whose cross-attention
//! covers it best, and turn chosen segments into masks at image resolution.
//!
//! Everything here is plain data (`Vec<f32>` grids with their shapes); the inputs come from
//! [`crate::attention::store::AttentionStore::self_attention`] and the word heat maps of
//! [`crate::analysis::heatmap`].
//!
//! | step | function | after |
//! |---|---|---|
//! | cluster, k given | [`kmeans_segments`] | local-prompt-mixing `attention_based_segmentation.py` |
//! | merge, no k | [`diffseg_segments`] | google/diffseg `segmentor.py` |
//! | name segments | [`label_segments`] | local-prompt-mixing (mean of min-max word maps, threshold) |
//! | masks | [`segments_mask`] | bilinear upsample + threshold, then dilate / feather |
//! | files | [`write_label_map_png`] (read back with [`read_label_map_png`]), [`write_mask_png`], [`write_segments_json`] | |
//! | checks | [`SegmentSettings::validate`], [`MaskSettings::validate`], [`check_k_for_grid`] | before a run, CLI and editor |
//!
//! Segment ids are numbered `0..segment_count` in the order the segments first appear in raster
//! order (top-left first), so the same clustering always gets the same ids.

mod checks;
mod diffseg;
mod files;
mod kmeans;
mod labels;
mod mask;

pub use checks::{
    check_count, check_fraction, check_k_for_grid, MAX_KMEANS_ITERATIONS, MAX_KMEANS_RUNS,
    MAX_MERGE_PASSES, MAX_SEGMENTS,
};
pub use diffseg::{
    aggregate_self_attention, anchor_cells, diffseg_segments, symmetric_kl, CellAssignment,
    DiffSegSettings,
};
pub use files::{
    mask_file_name, read_label_map_png, write_label_map_png, write_mask_png, write_segments_json,
    SegmentsFile, LABEL_MAP_KEYWORD,
};
pub use kmeans::{kmeans, kmeans_from_centroids, kmeans_segments, KMeansResult, KMeansSettings};
pub use labels::{
    is_label_candidate, label_segments, segments_with_label, set_prompt_word_indices, LabelChoice,
    LabelSettings, SegmentInfo, WordMapRef, WordScore,
};
pub use mask::{binary_mask_to_mask, segments_mask, Mask, MaskSettings};

use std::fmt;
use std::str::FromStr;

use crate::analysis::heatmap::{resize_bilinear, SelfAttentionMap};
use crate::analysis::{AnalysisError, AnalysisResult};

/// A segmentation: one segment id per cell of an `h x w` grid.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segmentation {
    /// Grid height (cells).
    pub h: usize,
    /// Grid width (cells).
    pub w: usize,
    /// `[h, w]`, row-major: the segment id of each cell, in `0..segment_count`.
    pub labels: Vec<usize>,
    /// Number of segments. Every id below it occurs in a segmentation made by the clustering
    /// functions; one resized with [`Segmentation::resized`] may lose segments thinner than a pixel.
    pub segment_count: usize,
}

impl Segmentation {
    /// Builds a segmentation from arbitrary cluster ids `[h, w]`, renumbering them `0..n` in the order
    /// they first appear in raster order. Fails when `labels` is not `h * w` long or the grid is empty.
    pub fn from_cluster_ids(h: usize, w: usize, cluster_ids: &[usize]) -> AnalysisResult<Self> {
        if h == 0 || w == 0 || cluster_ids.len() != h * w {
            return Err(AnalysisError::InvalidArgument {
                name: "segment labels",
                reason: format!(
                    "{} labels for a {h}x{w} grid (expected {}, grid not empty)",
                    cluster_ids.len(),
                    h * w
                ),
            });
        }
        let mut renumbered: std::collections::HashMap<usize, usize> =
            std::collections::HashMap::new();
        let labels = cluster_ids
            .iter()
            .map(|cluster| {
                let next_id = renumbered.len();
                *renumbered.entry(*cluster).or_insert(next_id)
            })
            .collect();
        Ok(Self {
            h,
            w,
            labels,
            segment_count: renumbered.len(),
        })
    }

    /// The segment id at cell `(y, x)`, `None` outside the grid.
    pub fn segment_at(&self, y: usize, x: usize) -> Option<usize> {
        if y >= self.h || x >= self.w {
            return None;
        }
        self.labels.get(y * self.w + x).copied()
    }

    /// The segment under a point given in another resolution (an image of `image_h x image_w`
    /// pixels, e.g. a click on the displayed image). `None` outside the image.
    pub fn segment_at_image_point(
        &self,
        image_h: usize,
        image_w: usize,
        pixel_y: usize,
        pixel_x: usize,
    ) -> Option<usize> {
        if pixel_y >= image_h || pixel_x >= image_w {
            return None;
        }
        self.segment_at(pixel_y * self.h / image_h, pixel_x * self.w / image_w)
    }

    /// Cells per segment: `[segment_count]`.
    pub fn cell_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.segment_count];
        for &label in &self.labels {
            if let Some(count) = counts.get_mut(label) {
                *count += 1;
            }
        }
        counts
    }

    /// `[h, w]`: 1 where the cell belongs to one of `segment_ids`, else 0 (unknown ids are ignored).
    pub fn indicator(&self, segment_ids: &[usize]) -> Vec<f32> {
        self.labels
            .iter()
            .map(|label| {
                if segment_ids.contains(label) {
                    1.0
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The same segmentation at `out_h x out_w`: each segment's indicator is upsampled bilinearly and
    /// every pixel takes the segment with the highest value (lowest id on ties), so boundaries are
    /// smooth rather than blocky and agree with [`segments_mask`] at threshold 0.5. Ids are kept.
    pub fn resized(&self, out_h: usize, out_w: usize) -> Segmentation {
        if (out_h, out_w) == (self.h, self.w) {
            return self.clone();
        }
        let mut best_value = vec![f32::NEG_INFINITY; out_h * out_w];
        let mut labels = vec![0usize; out_h * out_w];
        for segment in 0..self.segment_count {
            let upsampled =
                resize_bilinear(&self.indicator(&[segment]), self.h, self.w, out_h, out_w);
            for ((best, label), value) in best_value.iter_mut().zip(&mut labels).zip(upsampled) {
                if value > *best {
                    *best = value;
                    *label = segment;
                }
            }
        }
        Segmentation {
            h: out_h,
            w: out_w,
            labels,
            segment_count: self.segment_count,
        }
    }

    /// `[h, w, 3]` RGB: every cell in its segment's [`segment_colour`].
    pub fn colourised(&self) -> Vec<u8> {
        self.labels
            .iter()
            .flat_map(|&label| segment_colour(label))
            .collect()
    }
}

/// A distinct, stable colour per segment id for overlays (hues spread by the golden angle, fixed
/// saturation and value).
pub fn segment_colour(segment_id: usize) -> [u8; 3] {
    const GOLDEN_TURN: f32 = 0.618_034;
    let hue = (segment_id as f32 * GOLDEN_TURN).fract() * 6.0;
    let (saturation, value) = (0.65f32, 0.95f32);
    let chroma = value * saturation;
    let second = chroma * (1.0 - (hue % 2.0 - 1.0).abs());
    let (red, green, blue) = match hue as u32 {
        0 => (chroma, second, 0.0),
        1 => (second, chroma, 0.0),
        2 => (0.0, chroma, second),
        3 => (0.0, second, chroma),
        4 => (second, 0.0, chroma),
        _ => (chroma, 0.0, second),
    };
    let base = value - chroma;
    [red, green, blue].map(|channel| ((channel + base) * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// Which clustering makes the segments.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SegmentMethod {
    /// KMeans over the rows of the largest self-attention map; needs a segment count k.
    #[default]
    KMeans,
    /// DiffSeg's iterative merging of anchor attention maps over all resolutions; finds the count.
    DiffSeg,
}

impl SegmentMethod {
    /// Both methods, in menu order.
    pub const ALL: [SegmentMethod; 2] = [SegmentMethod::KMeans, SegmentMethod::DiffSeg];

    /// The lower-case name used on the command line and in files (`kmeans`, `diffseg`).
    pub fn name(self) -> &'static str {
        match self {
            SegmentMethod::KMeans => "kmeans",
            SegmentMethod::DiffSeg => "diffseg",
        }
    }
}

impl fmt::Display for SegmentMethod {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for SegmentMethod {
    type Err = String;

    /// Case-insensitive `kmeans` or `diffseg`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        SegmentMethod::ALL
            .into_iter()
            .find(|method| method.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| {
                format!("unknown segmentation method {text:?} (expected kmeans or diffseg)")
            })
    }
}

/// Everything [`segment_self_attention`] and [`segment_and_label`] need; the UI's method, k and
/// threshold controls edit it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegmentSettings {
    /// Which clustering to run.
    pub method: SegmentMethod,
    /// Settings of [`SegmentMethod::KMeans`].
    pub kmeans: KMeansSettings,
    /// Settings of [`SegmentMethod::DiffSeg`].
    pub diffseg: DiffSegSettings,
    /// How segments are named.
    pub labels: LabelSettings,
}

/// A segmentation with its labels, at the attention grid and at image resolution: what the
/// Segments view shows and `attend segment` writes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelledSegmentation {
    /// The method that made it.
    pub method: SegmentMethod,
    /// Segment ids on the attention grid the clustering ran on (32x32 for SD at 512 px).
    pub grid: Segmentation,
    /// The same ids at image resolution ([`Segmentation::resized`]).
    pub image: Segmentation,
    /// One entry per segment id: label, every word's score, pixel count at image resolution.
    pub segments: Vec<SegmentInfo>,
}

impl LabelledSegmentation {
    /// The mask of the chosen segments at image resolution.
    pub fn mask(&self, segment_ids: &[usize], settings: &MaskSettings) -> Mask {
        segments_mask(
            &self.grid,
            segment_ids,
            self.image.h,
            self.image.w,
            settings,
        )
    }

    /// The segment under image pixel `(pixel_y, pixel_x)`, `None` outside the image.
    pub fn segment_at_pixel(&self, pixel_y: usize, pixel_x: usize) -> Option<usize> {
        self.image.segment_at(pixel_y, pixel_x)
    }
}

/// Segments self-attention maps (see [`segment_self_attention`]), brings the segmentation to
/// `image_h x image_w` and labels it with the words' maps (see [`label_segments`]), scoring at image
/// resolution so pixel counts are image pixels.
pub fn segment_and_label(
    maps: &[SelfAttentionMap],
    words: &[WordMapRef<'_>],
    settings: &SegmentSettings,
    image_h: usize,
    image_w: usize,
) -> AnalysisResult<LabelledSegmentation> {
    if image_h == 0 || image_w == 0 {
        return Err(AnalysisError::InvalidArgument {
            name: "image size",
            reason: format!("{image_w}x{image_h} is empty"),
        });
    }
    settings.validate()?;
    let grid = segment_self_attention(maps, settings)?;
    let image = grid.resized(image_h, image_w);
    let segments = label_segments(&image, words, &settings.labels)?;
    Ok(LabelledSegmentation {
        method: settings.method,
        grid,
        image,
        segments,
    })
}

/// Segments self-attention maps with the chosen method: KMeans uses the map with the largest grid
/// (the first of them when several share it), DiffSeg all of them. Each map is `[h * w, h * w]`.
pub fn segment_self_attention(
    maps: &[SelfAttentionMap],
    settings: &SegmentSettings,
) -> AnalysisResult<Segmentation> {
    match settings.method {
        SegmentMethod::KMeans => {
            let largest = maps
                .iter()
                .rev()
                .max_by_key(|map| map.h * map.w)
                .ok_or_else(|| AnalysisError::InvalidArgument {
                    name: "self-attention maps",
                    reason: "no self-attention map to segment (was self-attention stored?)"
                        .to_string(),
                })?;
            kmeans_segments(largest, &settings.kmeans)
        }
        SegmentMethod::DiffSeg => diffseg_segments(maps, &settings.diffseg),
    }
}

/// Checks that a self-attention map is `[h * w, h * w]` and not empty.
fn check_self_attention(map: &SelfAttentionMap) -> AnalysisResult<()> {
    let cells = map.h * map.w;
    if cells == 0 || map.data.len() != cells * cells {
        return Err(AnalysisError::InvalidArgument {
            name: "self-attention map",
            reason: format!(
                "{}x{} grid with {} values (expected {cells}² = {}, grid not empty)",
                map.h,
                map.w,
                map.data.len(),
                cells * cells
            ),
        });
    }
    Ok(())
}

/// A small deterministic generator (SplitMix64) for the seeded initialisations.
#[derive(Clone, Debug)]
struct SegmentRng(u64);

impl SegmentRng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [0, n); 0 when n is 0.
    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (chunk_a, chunk_b) in chunks_a.zip(chunks_b) {
        for lane in 0..8 {
            lanes[lane] += chunk_a[lane] * chunk_b[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}
