//! DiffSeg-style segmentation (after google/diffseg `diffseg/segmentor.py`): no segment count needed.
//!
//! 1. **Aggregate** ([`aggregate_self_attention`]): every resolution's attention map (one per query
//!    pixel, over the key pixels) is upsampled bilinearly to a common grid and renormalised to sum 1;
//!    query pixels are repeated to the common grid (nearest); resolutions are averaged weighted by
//!    their side length.
//! 2. **Anchors** ([`anchor_cells`]): a regular grid of query pixels (16x16 by default), placed as
//!    DiffSeg places its grid on 64x64 (spacing `(side - 1) / (n - 1)`, centred).
//! 3. **Merge, first pass**: every anchor's proposal is the mean of all attention maps whose symmetric
//!    KL divergence ([`symmetric_kl`], half each way) to the anchor's map is below the threshold.
//! 4. **Merge, later passes**: proposals are visited in order; an unvisited one takes the mean of all
//!    proposals within the threshold (visited or not, as in the reference) and marks them visited.
//! 5. **Refine** (optional, on by default as in the reference's demo): KMeans over all attention
//!    maps seeded with the proposals; each cluster's mean map becomes a proposal.
//! 6. **Label**: every cell takes the proposal with the highest value there
//!    ([`CellAssignment::ProposalArgmax`], DiffSeg's), or the proposal nearest to its own map
//!    ([`CellAssignment::NearestProposal`]).
//!
//! [`DiffSegSettings::reference`] holds DiffSeg's own values. attend's defaults differ in two ways,
//! measured on the bundled model (scenes 0-3, segments picked by overlap with the drawn objects,
//! mIoU 0.00 with the reference settings, 0.83 with the defaults, KMeans k = 5: 0.82):
//! - the threshold is relative ([`DiffSegSettings::relative_threshold`]): 0.25 of the 95th
//!   percentile of the anchors' divergences. DiffSeg's absolute 0.9 was tuned on SD's peaked 64x64
//!   maps; on a small model's 32x32 maps every divergence is below it and everything merges;
//! - cells take their nearest proposal: with diffuse attention, the per-cell argmax lets small,
//!   peaked proposals take the cells around them.
//!
//! Other differences from the reference: the common grid is the largest grid given (64x64 there,
//! because SD at 512 px has 64x64 self-attention; attend stores up to 32x32 by default), and cells
//! are labelled on that grid; [`Segmentation::resized`] brings the result to image resolution. The
//! divergence is computed in f32 with probabilities floored at 1e-12 (the reference casts to f16).

use super::{check_self_attention, kmeans_from_centroids, KMeansSettings, Segmentation};
use crate::analysis::heatmap::{resize_bilinear, SelfAttentionMap};
use crate::analysis::{AnalysisError, AnalysisResult};

/// Probabilities are floored at this value before taking logarithms.
const PROBABILITY_FLOOR: f32 = 1e-12;

/// Settings of [`diffseg_segments`]; see [`DiffSegSettings::reference`] for DiffSeg's own values.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiffSegSettings {
    /// Anchors per side of the anchor grid (capped at the grid side). Default 16 (256 anchors).
    pub anchor_side: usize,
    /// Maps whose symmetric KL divergence is below this merge, unless `relative_threshold` is set.
    /// DiffSeg's value: 0.9.
    pub kl_threshold: f32,
    /// Merge passes (the first from the anchors, the others among proposals). Default 3.
    pub passes: usize,
    /// Refine the proposals with KMeans seeded by them. Default true.
    pub refine: bool,
    /// Common grid `(h, w)`; `None`: the largest grid among the maps. Default `None`.
    pub grid: Option<(usize, usize)>,
    /// When set, the merge threshold is this fraction of the 95th percentile of the symmetric KL
    /// divergences between anchors, and `kl_threshold` is not used. Divergences scale with how
    /// peaked a model's self-attention is (and with the grid), so a fixed threshold tuned on SD's
    /// 64x64 maps merges everything on small models; a relative one adapts. Default `Some(0.25)`
    /// (DiffSeg: `None`).
    pub relative_threshold: Option<f32>,
    /// How cells get their segment once the proposals are made. Default
    /// [`CellAssignment::NearestProposal`] (DiffSeg: [`CellAssignment::ProposalArgmax`]).
    pub cell_assignment: CellAssignment,
}

/// How [`diffseg_segments`] gives every cell a segment from the final proposals (maps over the
/// key cells).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum CellAssignment {
    /// DiffSeg's: each cell takes the proposal with the most attention *at* it. Small, peaked
    /// proposals win the cells around them when attention is diffuse.
    ProposalArgmax,
    /// Each cell takes the proposal closest (symmetric KL) to *its own* attention map, as a
    /// clustering of the query cells would.
    #[default]
    NearestProposal,
}

impl Default for DiffSegSettings {
    /// DiffSeg's anchors, passes and refinement with the two adaptations that make it work on small
    /// models: a relative threshold (0.25 of the anchors' 95th-percentile divergence) and cells
    /// assigned to their nearest proposal. See [`DiffSegSettings::reference`] for the original.
    fn default() -> Self {
        Self {
            relative_threshold: Some(0.25),
            cell_assignment: CellAssignment::NearestProposal,
            ..Self::reference()
        }
    }
}

impl DiffSegSettings {
    /// DiffSeg's own settings (google/diffseg): 16x16 anchors, absolute threshold 0.9, 3 passes,
    /// KMeans refinement, per-cell argmax over the proposals.
    pub fn reference() -> Self {
        Self {
            anchor_side: 16,
            kl_threshold: 0.9,
            passes: 3,
            refine: true,
            grid: None,
            relative_threshold: None,
            cell_assignment: CellAssignment::ProposalArgmax,
        }
    }
}

/// Brings self-attention maps of several resolutions to one `grid_h x grid_w` grid: every row (the
/// map of one query pixel over the keys) is upsampled bilinearly to the grid and renormalised to sum
/// 1, query pixels are repeated to the grid (nearest), and the resolutions are averaged weighted by
/// their side length `sqrt(h * w)`. Each map is `[h * w, h * w]`; the result is
/// `[grid_h * grid_w, grid_h * grid_w]` with rows summing to 1.
pub fn aggregate_self_attention(
    maps: &[SelfAttentionMap],
    grid_h: usize,
    grid_w: usize,
) -> AnalysisResult<SelfAttentionMap> {
    if maps.is_empty() {
        return Err(AnalysisError::InvalidArgument {
            name: "self-attention maps",
            reason: "no self-attention map to aggregate (was self-attention stored?)".to_string(),
        });
    }
    if grid_h == 0 || grid_w == 0 {
        return Err(AnalysisError::InvalidArgument {
            name: "DiffSeg grid",
            reason: format!("{grid_h}x{grid_w} is empty"),
        });
    }
    for map in maps {
        check_self_attention(map)?;
    }
    let grid_cells = grid_h * grid_w;
    let side_total: f32 = maps.iter().map(|map| ((map.h * map.w) as f32).sqrt()).sum();
    let mut data = vec![0.0f32; grid_cells * grid_cells];
    for map in maps {
        let weight = ((map.h * map.w) as f32).sqrt() / side_total;
        let cells = map.h * map.w;
        // The grid's query cells that repeat each source query cell.
        let mut targets_of_source: Vec<Vec<usize>> = vec![Vec::new(); cells];
        for y in 0..grid_h {
            for x in 0..grid_w {
                let source = (y * map.h / grid_h) * map.w + x * map.w / grid_w;
                targets_of_source[source].push(y * grid_w + x);
            }
        }
        for (row, targets) in map.data.chunks_exact(cells).zip(&targets_of_source) {
            if targets.is_empty() {
                continue;
            }
            let mut upsampled = resize_bilinear(row, map.h, map.w, grid_h, grid_w);
            upsampled
                .iter_mut()
                .for_each(|value| *value = value.max(0.0));
            let sum: f32 = upsampled.iter().sum();
            let scale = if sum > 0.0 { weight / sum } else { 0.0 };
            for &target in targets {
                data[target * grid_cells..(target + 1) * grid_cells]
                    .iter_mut()
                    .zip(&upsampled)
                    .for_each(|(out, value)| *out += scale * value);
            }
        }
    }
    Ok(SelfAttentionMap {
        h: grid_h,
        w: grid_w,
        layer_count: maps.iter().map(|map| map.layer_count).sum(),
        step_count: maps.iter().map(|map| map.step_count).max().unwrap_or(0),
        data,
    })
}

/// Anchor cells (row-major indices into the `grid_h x grid_w` grid): `min(anchor_side, side)` per
/// axis, spaced `(side - 1) / (n - 1)` apart and centred, as DiffSeg's sampling grid (16 anchors on
/// 64 cells sit at 1, 5, ..., 61). Rows outer, columns inner.
pub fn anchor_cells(grid_h: usize, grid_w: usize, anchor_side: usize) -> Vec<usize> {
    let positions = |size: usize| -> Vec<usize> {
        let count = anchor_side.min(size);
        match count {
            0 => Vec::new(),
            1 => vec![(size - 1) / 2],
            _ => {
                let spacing = (size - 1) / (count - 1);
                let start = (size - 1 - spacing * (count - 1)) / 2;
                (0..count).map(|index| start + index * spacing).collect()
            }
        }
    };
    let columns = positions(grid_w);
    positions(grid_h)
        .into_iter()
        .flat_map(|y| columns.iter().map(move |&x| y * grid_w + x))
        .collect()
}

/// Symmetric KL divergence, half each way: `0.5 * KL(p || q) + 0.5 * KL(q || p)
/// = 0.5 * Σ (p - q) (ln p - ln q)`, with probabilities floored at 1e-12. `p` and `q` are
/// distributions of the same length (extra values of the longer one are ignored).
pub fn symmetric_kl(p: &[f32], q: &[f32]) -> f32 {
    symmetric_kl_with_logs(p, &floored_logs(p), q, &floored_logs(q))
}

fn floored_logs(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&value| value.max(PROBABILITY_FLOOR).ln())
        .collect()
}

/// [`symmetric_kl`] with the logarithms already taken (eight accumulators, for speed).
fn symmetric_kl_with_logs(p: &[f32], log_p: &[f32], q: &[f32], log_q: &[f32]) -> f32 {
    let length = p.len().min(q.len()).min(log_p.len()).min(log_q.len());
    let (p, log_p, q, log_q) = (
        &p[..length],
        &log_p[..length],
        &q[..length],
        &log_q[..length],
    );
    let mut lanes = [0.0f32; 8];
    for (((p8, log_p8), q8), log_q8) in p
        .chunks_exact(8)
        .zip(log_p.chunks_exact(8))
        .zip(q.chunks_exact(8))
        .zip(log_q.chunks_exact(8))
    {
        for (lane, sum) in lanes.iter_mut().enumerate() {
            *sum += (p8[lane] - q8[lane]) * (log_p8[lane] - log_q8[lane]);
        }
    }
    let full = length - length % 8;
    let tail: f32 = (full..length)
        .map(|index| (p[index] - q[index]) * (log_p[index] - log_q[index]))
        .sum();
    0.5 * (lanes.iter().sum::<f32>() + tail)
}

/// Segments self-attention maps of one or more resolutions by DiffSeg's iterative merging (see the
/// module docs). Each map is `[h * w, h * w]`; the segmentation is on the common grid.
pub fn diffseg_segments(
    maps: &[SelfAttentionMap],
    settings: &DiffSegSettings,
) -> AnalysisResult<Segmentation> {
    settings.validate()?;
    let (grid_h, grid_w) = match settings.grid {
        Some(grid) => grid,
        None => maps
            .iter()
            .rev()
            .max_by_key(|map| map.h * map.w)
            .map(|map| (map.h, map.w))
            .ok_or_else(|| AnalysisError::InvalidArgument {
                name: "self-attention maps",
                reason: "no self-attention map to segment (was self-attention stored?)".to_string(),
            })?,
    };
    let aggregated = aggregate_self_attention(maps, grid_h, grid_w)?;
    let cells = grid_h * grid_w;
    let rows = &aggregated.data;
    let row_logs = floored_logs(rows);
    let row = |index: usize| &rows[index * cells..(index + 1) * cells];
    let row_log = |index: usize| &row_logs[index * cells..(index + 1) * cells];

    let anchors = anchor_cells(grid_h, grid_w, settings.anchor_side);
    let kl_threshold = match settings.relative_threshold {
        Some(fraction) => fraction * anchor_divergence_percentile(&anchors, &row, &row_log, 0.95),
        None => settings.kl_threshold,
    };

    // First pass: one proposal per anchor, the mean of the maps close to the anchor's.
    let mut proposals: Vec<Vec<f32>> = Vec::new();
    for &anchor in &anchors {
        let mut sum = vec![0.0f32; cells];
        let mut count = 0usize;
        for candidate in 0..cells {
            let divergence = symmetric_kl_with_logs(
                row(anchor),
                row_log(anchor),
                row(candidate),
                row_log(candidate),
            );
            if divergence < kl_threshold {
                add_into(&mut sum, row(candidate));
                count += 1;
            }
        }
        if count > 0 {
            let scale = 1.0 / count as f32;
            sum.iter_mut().for_each(|value| *value *= scale);
            proposals.push(sum);
        }
    }

    // Later passes: greedy merging of the proposals.
    for _ in 1..settings.passes {
        proposals = merge_proposals(&proposals, kl_threshold);
    }
    if proposals.is_empty() {
        return Err(AnalysisError::InvalidArgument {
            name: "DiffSeg anchors",
            reason: format!(
                "no proposal was made (anchor_side {}, threshold {kl_threshold})",
                settings.anchor_side
            ),
        });
    }

    if settings.refine {
        let initial: Vec<f32> = proposals.iter().flatten().copied().collect();
        let clustering = kmeans_from_centroids(rows, cells, &initial, &KMeansSettings::default())?;
        let mut sums = vec![vec![0.0f32; cells]; clustering.k];
        let mut counts = vec![0usize; clustering.k];
        for (index, &cluster) in clustering.labels.iter().enumerate() {
            add_into(&mut sums[cluster], row(index));
            counts[cluster] += 1;
        }
        proposals = sums
            .into_iter()
            .zip(counts)
            .filter(|&(_, count)| count > 0)
            .map(|(mut sum, count)| {
                let scale = 1.0 / count as f32;
                sum.iter_mut().for_each(|value| *value *= scale);
                sum
            })
            .collect();
    }

    let labels: Vec<usize> = match settings.cell_assignment {
        // Each cell goes to the proposal with the most attention there (lowest index on ties).
        CellAssignment::ProposalArgmax => (0..cells)
            .map(|cell| {
                let mut best = (f32::NEG_INFINITY, 0usize);
                for (index, proposal) in proposals.iter().enumerate() {
                    if proposal[cell] > best.0 {
                        best = (proposal[cell], index);
                    }
                }
                best.1
            })
            .collect(),
        // Each cell goes to the proposal nearest to its own map.
        CellAssignment::NearestProposal => {
            let proposal_logs: Vec<Vec<f32>> = proposals
                .iter()
                .map(|proposal| floored_logs(proposal))
                .collect();
            (0..cells)
                .map(|cell| {
                    let mut best = (f32::INFINITY, 0usize);
                    for (index, (proposal, proposal_log)) in
                        proposals.iter().zip(&proposal_logs).enumerate()
                    {
                        let divergence = symmetric_kl_with_logs(
                            row(cell),
                            row_log(cell),
                            proposal,
                            proposal_log,
                        );
                        if divergence < best.0 {
                            best = (divergence, index);
                        }
                    }
                    best.1
                })
                .collect()
        }
    };
    Segmentation::from_cluster_ids(grid_h, grid_w, &labels)
}

/// The `quantile` (0..1) of the symmetric KL divergences between distinct anchors' maps (0 with
/// fewer than two anchors).
fn anchor_divergence_percentile<'a>(
    anchors: &[usize],
    row: &impl Fn(usize) -> &'a [f32],
    row_log: &impl Fn(usize) -> &'a [f32],
    quantile: f32,
) -> f32 {
    let mut divergences = Vec::with_capacity(anchors.len() * anchors.len() / 2);
    for (position, &first) in anchors.iter().enumerate() {
        for &second in &anchors[position + 1..] {
            divergences.push(symmetric_kl_with_logs(
                row(first),
                row_log(first),
                row(second),
                row_log(second),
            ));
        }
    }
    if divergences.is_empty() {
        return 0.0;
    }
    divergences.sort_by(f32::total_cmp);
    let index = ((divergences.len() - 1) as f32 * quantile.clamp(0.0, 1.0)).round() as usize;
    divergences[index.min(divergences.len() - 1)]
}

/// One greedy merge pass: each proposal not yet taken becomes the mean of every proposal within the
/// threshold of it (itself included), and those are marked taken.
fn merge_proposals(proposals: &[Vec<f32>], kl_threshold: f32) -> Vec<Vec<f32>> {
    let logs: Vec<Vec<f32>> = proposals
        .iter()
        .map(|proposal| floored_logs(proposal))
        .collect();
    let mut taken = vec![false; proposals.len()];
    let mut merged = Vec::new();
    for anchor in 0..proposals.len() {
        if taken[anchor] {
            continue;
        }
        taken[anchor] = true;
        let cells = proposals[anchor].len();
        let mut sum = vec![0.0f32; cells];
        let mut count = 0usize;
        for candidate in 0..proposals.len() {
            let divergence = symmetric_kl_with_logs(
                &proposals[anchor],
                &logs[anchor],
                &proposals[candidate],
                &logs[candidate],
            );
            if divergence < kl_threshold {
                add_into(&mut sum, &proposals[candidate]);
                count += 1;
                taken[candidate] = true;
            }
        }
        if count == 0 {
            // Only a negative threshold excludes the anchor itself; keep it as it is.
            merged.push(proposals[anchor].clone());
            continue;
        }
        let scale = 1.0 / count as f32;
        sum.iter_mut().for_each(|value| *value *= scale);
        merged.push(sum);
    }
    merged
}

fn add_into(target: &mut [f32], source: &[f32]) {
    target
        .iter_mut()
        .zip(source)
        .for_each(|(sum, value)| *sum += value);
}
