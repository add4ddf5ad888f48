//! KMeans over the rows of a self-attention matrix (after local-prompt-mixing's
//! `attention_based_segmentation.py`, which runs scikit-learn's KMeans with `n_init=10`,
//! `random_state=1`, k = 5 on the 32x32 self-attention): every query pixel is a point whose
//! coordinates are the attention it pays to every pixel, so pixels that look at the same region end
//! up in the same cluster.
//!
//! The algorithm is Lloyd's with greedy k-means++ seeding (`2 + ln k` candidates per centre, the one
//! that lowers the potential most is kept), the best of `n_init` seeded runs by inertia, convergence
//! when the centres move less than `tolerance` times the mean per-dimension variance of the data (as
//! scikit-learn), and empty clusters moved to the points farthest from their centres. The random
//! numbers come from attend's own SplitMix64, so clusterings match scikit-learn's in quality, not
//! number for number.
//!
//! One addition, on by default ([`KMeansSettings::merge_fraction`]): clusters whose centres are
//! nearly the same distribution merge, so a plain background is one segment rather than k - n
//! speckled ones. On the bundled model, background splits have centre divergences of 0.006-0.03
//! against 0.06-1.7 between real regions.

use super::{check_self_attention, dot, symmetric_kl, SegmentRng, Segmentation};
use crate::analysis::heatmap::SelfAttentionMap;
use crate::analysis::{AnalysisError, AnalysisResult};

/// Settings of [`kmeans`] and [`kmeans_segments`]; the defaults are local-prompt-mixing's, plus
/// the merging of near-identical clusters (see [`KMeansSettings::reference`] for theirs alone).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KMeansSettings {
    /// Number of clusters. Default 5.
    pub k: usize,
    /// Number of seeded runs; the one with the lowest inertia wins. Default 10.
    pub n_init: usize,
    /// Seed of the k-means++ initialisation. Default 1.
    pub seed: u64,
    /// Most Lloyd iterations per run. Default 300.
    pub max_iterations: usize,
    /// A run stops when the squared centre shift is below `tolerance` times the mean per-dimension
    /// variance of the points. Default 1e-4.
    pub tolerance: f32,
    /// [`kmeans_segments`] only: clusters whose centres' symmetric KL divergence is below this
    /// fraction of the largest divergence between centres merge (transitively). When k is larger
    /// than the number of regions, KMeans splits a uniform region (a plain background) into
    /// arbitrary speckled parts whose centres are nearly identical; merging them leaves one clean
    /// segment, so k acts as the most segments wanted. Default `Some(0.05)`; `None` keeps all k.
    pub merge_fraction: Option<f32>,
    /// [`kmeans_segments`] only: after merging, a cluster with fewer cells than this fraction of
    /// the grid is dissolved and each of its cells joins the nearest remaining cluster (squared
    /// distance to the cluster's mean attention, KMeans' own measure). KMeans gives the mixed
    /// attention of an object's outline cells a cluster of their own: thin rims of a few cells
    /// whose word scores fall between object and background. Default `Some(0.01)` (about 10
    /// cells at 32x32; the smallest scene object covers about twice that); `None` keeps them.
    #[serde(default = "default_min_segment_fraction")]
    pub min_segment_fraction: Option<f32>,
}

fn default_min_segment_fraction() -> Option<f32> {
    Some(0.01)
}

impl Default for KMeansSettings {
    fn default() -> Self {
        Self {
            k: 5,
            n_init: 10,
            seed: 1,
            max_iterations: 300,
            tolerance: 1e-4,
            merge_fraction: Some(0.05),
            min_segment_fraction: default_min_segment_fraction(),
        }
    }
}

impl KMeansSettings {
    /// local-prompt-mixing's settings alone: k = 5, 10 runs, seed 1, no merging or dissolving.
    pub fn reference() -> Self {
        Self {
            merge_fraction: None,
            min_segment_fraction: None,
            ..Self::default()
        }
    }
}

/// The outcome of one clustering.
#[derive(Clone, Debug, PartialEq)]
pub struct KMeansResult {
    /// `[points]`: the cluster of each point, in `0..k`.
    pub labels: Vec<usize>,
    /// `[k, dim]`, row-major: the cluster centres.
    pub centroids: Vec<f32>,
    /// Number of clusters.
    pub k: usize,
    /// Sum of squared distances from the points to their centres.
    pub inertia: f64,
    /// Lloyd iterations of the winning run.
    pub iterations: usize,
}

/// Clusters the rows of `points` (`[n, dim]`, row-major) into `settings.k` clusters.
/// Fails when `points` is not a whole number of non-empty rows or when `k` is 0 or above `n`.
pub fn kmeans(
    points: &[f32],
    dim: usize,
    settings: &KMeansSettings,
) -> AnalysisResult<KMeansResult> {
    let point_count = check_points(points, dim)?;
    check_cluster_count(settings.k, point_count)?;
    super::check_count("n_init", settings.n_init, 1, super::MAX_KMEANS_RUNS)?;
    let squared_norms = squared_norms(points, dim);
    let tolerance = absolute_tolerance(points, dim, settings.tolerance);
    let mut rng = SegmentRng::new(settings.seed);
    let mut best: Option<KMeansResult> = None;
    for _ in 0..settings.n_init {
        let initial = kmeans_plus_plus(points, dim, &squared_norms, settings.k, &mut rng);
        let result = lloyd(
            points,
            dim,
            &squared_norms,
            initial,
            settings.max_iterations,
            tolerance,
        );
        if best
            .as_ref()
            .is_none_or(|current| result.inertia < current.inertia)
        {
            best = Some(result);
        }
    }
    best.ok_or_else(|| AnalysisError::InvalidArgument {
        name: "n_init",
        reason: "no KMeans run was made".to_string(),
    })
}

/// One Lloyd run from the given centres `[k, dim]` (DiffSeg's refinement: KMeans seeded with the
/// merged proposals); `n_init` and `seed` are not used.
pub fn kmeans_from_centroids(
    points: &[f32],
    dim: usize,
    initial_centroids: &[f32],
    settings: &KMeansSettings,
) -> AnalysisResult<KMeansResult> {
    let point_count = check_points(points, dim)?;
    if initial_centroids.is_empty() || !initial_centroids.len().is_multiple_of(dim) {
        return Err(AnalysisError::InvalidArgument {
            name: "initial centroids",
            reason: format!(
                "{} values is not a non-zero whole number of {dim}-long rows",
                initial_centroids.len()
            ),
        });
    }
    check_cluster_count(initial_centroids.len() / dim, point_count)?;
    let squared_norms = squared_norms(points, dim);
    let tolerance = absolute_tolerance(points, dim, settings.tolerance);
    Ok(lloyd(
        points,
        dim,
        &squared_norms,
        initial_centroids.to_vec(),
        settings.max_iterations,
        tolerance,
    ))
}

/// Segments an `h x w` grid by clustering the rows of its self-attention `[h * w, h * w]`.
pub fn kmeans_segments(
    self_attention: &SelfAttentionMap,
    settings: &KMeansSettings,
) -> AnalysisResult<Segmentation> {
    settings.validate()?;
    check_self_attention(self_attention)?;
    let cells = self_attention.h * self_attention.w;
    let result = kmeans(&self_attention.data, cells, settings)?;
    let labels = match settings.merge_fraction {
        Some(fraction) => merge_similar_clusters(&result, cells, fraction),
        None => result.labels,
    };
    let labels = match settings.min_segment_fraction {
        Some(fraction) => dissolve_small_clusters(&self_attention.data, cells, labels, fraction),
        None => labels,
    };
    Segmentation::from_cluster_ids(self_attention.h, self_attention.w, &labels)
}

/// Gives the points of every cluster with fewer than `fraction * points` members to the nearest
/// cluster (squared distance to its mean) among the others. The largest cluster always stays.
fn dissolve_small_clusters(
    points: &[f32],
    dim: usize,
    mut labels: Vec<usize>,
    fraction: f32,
) -> Vec<usize> {
    let count = labels.len();
    let clusters = labels.iter().copied().max().map_or(0, |max| max + 1);
    let mut sizes = vec![0usize; clusters];
    for &label in &labels {
        sizes[label] += 1;
    }
    #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
    let min_size = (fraction.max(0.0) * count as f32).ceil() as usize;
    let largest = (0..clusters)
        .max_by_key(|&cluster| sizes[cluster])
        .unwrap_or(0);
    let kept: Vec<usize> = (0..clusters)
        .filter(|&cluster| sizes[cluster] > 0 && (sizes[cluster] >= min_size || cluster == largest))
        .collect();
    if kept.len() == sizes.iter().filter(|&&size| size > 0).count() {
        return labels;
    }
    // Each kept cluster's slot in `means`; `None` for the clusters being dissolved.
    let mut slot_of = vec![None; clusters];
    for (slot, &cluster) in kept.iter().enumerate() {
        slot_of[cluster] = Some(slot);
    }
    let mut means = vec![0.0f64; kept.len() * dim];
    for (point, &label) in points.chunks_exact(dim).zip(&labels) {
        if let Some(slot) = slot_of[label] {
            for (sum, &value) in means[slot * dim..(slot + 1) * dim].iter_mut().zip(point) {
                *sum += f64::from(value);
            }
        }
    }
    let means: Vec<f32> = means
        .chunks_exact(dim)
        .zip(&kept)
        .flat_map(|(sum, &cluster)| {
            let scale = 1.0 / sizes[cluster] as f64;
            sum.iter().map(move |&value| (value * scale) as f32)
        })
        .collect();
    let mean_norms = squared_norms_of(&means, dim);
    for (point, label) in points.chunks_exact(dim).zip(labels.iter_mut()) {
        if slot_of[*label].is_some() {
            continue;
        }
        let point_norm = dot(point, point);
        let nearest = means
            .chunks_exact(dim)
            .zip(&mean_norms)
            .map(|(mean, &norm)| squared_distance(point, point_norm, mean, norm))
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(largest, |(slot, _)| kept[slot]);
        *label = nearest;
    }
    labels
}

/// Relabels the points so that clusters whose centres (attention distributions) are closer than
/// `fraction` times the largest divergence between occupied clusters share a label.
fn merge_similar_clusters(result: &KMeansResult, dim: usize, fraction: f32) -> Vec<usize> {
    let mut occupied = vec![false; result.k];
    for &label in &result.labels {
        occupied[label] = true;
    }
    let centre = |cluster: usize| &result.centroids[cluster * dim..(cluster + 1) * dim];
    let mut pairs = Vec::new();
    for first in (0..result.k).filter(|&cluster| occupied[cluster]) {
        for second in (first + 1..result.k).filter(|&cluster| occupied[cluster]) {
            pairs.push((first, second, symmetric_kl(centre(first), centre(second))));
        }
    }
    let largest = pairs
        .iter()
        .map(|&(_, _, divergence)| divergence)
        .fold(0.0f32, f32::max);
    // Union-find over the clusters: each points towards its representative.
    let mut representative: Vec<usize> = (0..result.k).collect();
    let find = |representative: &[usize], mut cluster: usize| {
        while representative[cluster] != cluster {
            cluster = representative[cluster];
        }
        cluster
    };
    for &(first, second, divergence) in &pairs {
        if divergence < fraction * largest {
            let (a, b) = (find(&representative, first), find(&representative, second));
            representative[a.max(b)] = a.min(b);
        }
    }
    result
        .labels
        .iter()
        .map(|&label| find(&representative, label))
        .collect()
}

/// Number of rows of `points`, or an error when it is not a whole, non-zero number of rows.
fn check_points(points: &[f32], dim: usize) -> AnalysisResult<usize> {
    if dim == 0 || points.is_empty() || !points.len().is_multiple_of(dim) {
        return Err(AnalysisError::InvalidArgument {
            name: "KMeans points",
            reason: format!(
                "{} values is not a non-zero whole number of {dim}-long rows",
                points.len()
            ),
        });
    }
    Ok(points.len() / dim)
}

fn check_cluster_count(k: usize, point_count: usize) -> AnalysisResult<()> {
    if k == 0 || k > point_count {
        return Err(AnalysisError::InvalidArgument {
            name: "k",
            reason: format!("{k} clusters for {point_count} points (expected 1..={point_count})"),
        });
    }
    Ok(())
}

/// `[n]`: `|x|²` of every row.
fn squared_norms(points: &[f32], dim: usize) -> Vec<f32> {
    points.chunks_exact(dim).map(|row| dot(row, row)).collect()
}

/// scikit-learn's tolerance: the relative `tolerance` times the mean over dimensions of the
/// points' variance.
fn absolute_tolerance(points: &[f32], dim: usize, tolerance: f32) -> f64 {
    let point_count = (points.len() / dim) as f64;
    let mut sums = vec![0.0f64; dim];
    let mut squares = vec![0.0f64; dim];
    for row in points.chunks_exact(dim) {
        for ((sum, square), &value) in sums.iter_mut().zip(&mut squares).zip(row) {
            let value = f64::from(value);
            *sum += value;
            *square += value * value;
        }
    }
    let variance_sum: f64 = sums
        .iter()
        .zip(&squares)
        .map(|(sum, square)| {
            let mean = sum / point_count;
            (square / point_count - mean * mean).max(0.0)
        })
        .sum();
    f64::from(tolerance) * variance_sum / dim as f64
}

/// Squared distance between row `a` (with `|a|²`) and row `b` (with `|b|²`), never negative.
fn squared_distance(a: &[f32], a_norm: f32, b: &[f32], b_norm: f32) -> f32 {
    (a_norm - 2.0 * dot(a, b) + b_norm).max(0.0)
}

/// Greedy k-means++: the first centre uniformly at random; each next one the best (lowest total
/// squared distance) of `2 + ln k` candidates drawn with probability proportional to the squared
/// distance to the nearest centre so far. Returns `[k, dim]`.
fn kmeans_plus_plus(
    points: &[f32],
    dim: usize,
    squared_norms: &[f32],
    k: usize,
    rng: &mut SegmentRng,
) -> Vec<f32> {
    let point_count = squared_norms.len();
    let row = |index: usize| &points[index * dim..(index + 1) * dim];
    let distances_to = |centre: usize| -> Vec<f32> {
        (0..point_count)
            .map(|index| {
                squared_distance(
                    row(index),
                    squared_norms[index],
                    row(centre),
                    squared_norms[centre],
                )
            })
            .collect()
    };
    let candidate_count = 2 + (k as f64).ln() as usize;

    let first = rng.below(point_count);
    let mut centres = vec![first];
    let mut closest = distances_to(first);
    while centres.len() < k {
        let potential: f64 = closest.iter().map(|&value| f64::from(value)).sum();
        let mut best: Option<(f64, usize, Vec<f32>)> = None;
        for _ in 0..candidate_count {
            let candidate = sample_by_weight(&closest, potential, rng);
            let candidate_closest: Vec<f32> = distances_to(candidate)
                .into_iter()
                .zip(&closest)
                .map(|(new, &old)| new.min(old))
                .collect();
            let candidate_potential: f64 = candidate_closest
                .iter()
                .map(|&value| f64::from(value))
                .sum();
            if best
                .as_ref()
                .is_none_or(|(best_potential, _, _)| candidate_potential < *best_potential)
            {
                best = Some((candidate_potential, candidate, candidate_closest));
            }
        }
        let Some((_, chosen, chosen_closest)) = best else {
            break;
        };
        centres.push(chosen);
        closest = chosen_closest;
    }
    centres
        .iter()
        .flat_map(|&centre| row(centre).iter().copied())
        .collect()
}

/// An index drawn with probability `weights[i] / total`; uniform when every weight is 0.
fn sample_by_weight(weights: &[f32], total: f64, rng: &mut SegmentRng) -> usize {
    if total <= 0.0 {
        return rng.below(weights.len());
    }
    let target = rng.unit() * total;
    let mut cumulative = 0.0f64;
    for (index, &weight) in weights.iter().enumerate() {
        cumulative += f64::from(weight);
        if cumulative > target {
            return index;
        }
    }
    // Rounding left the target past the end: the last point with weight.
    weights
        .iter()
        .rposition(|&weight| weight > 0.0)
        .unwrap_or(0)
}

/// Assigns every point to its nearest centre; fills `labels` and `distances` (squared) and returns
/// the inertia.
fn assign(
    points: &[f32],
    dim: usize,
    squared_norms: &[f32],
    centroids: &[f32],
    labels: &mut [usize],
    distances: &mut [f32],
) -> f64 {
    let centroid_norms = squared_norms_of(centroids, dim);
    let mut inertia = 0.0f64;
    for (((point, &point_norm), label), distance) in points
        .chunks_exact(dim)
        .zip(squared_norms)
        .zip(labels.iter_mut())
        .zip(distances.iter_mut())
    {
        let mut best = (f32::INFINITY, 0usize);
        for (cluster, (centroid, &centroid_norm)) in
            centroids.chunks_exact(dim).zip(&centroid_norms).enumerate()
        {
            let candidate = squared_distance(point, point_norm, centroid, centroid_norm);
            if candidate < best.0 {
                best = (candidate, cluster);
            }
        }
        *distance = best.0;
        *label = best.1;
        inertia += f64::from(best.0);
    }
    inertia
}

fn squared_norms_of(rows: &[f32], dim: usize) -> Vec<f32> {
    rows.chunks_exact(dim).map(|row| dot(row, row)).collect()
}

/// The mean of each cluster's points; an empty cluster takes the point farthest from its centre
/// among those not yet used for this.
fn update_centroids(
    points: &[f32],
    dim: usize,
    labels: &[usize],
    distances: &[f32],
    k: usize,
) -> Vec<f32> {
    let mut sums = vec![0.0f64; k * dim];
    let mut counts = vec![0usize; k];
    for (point, &label) in points.chunks_exact(dim).zip(labels) {
        counts[label] += 1;
        for (sum, &value) in sums[label * dim..(label + 1) * dim].iter_mut().zip(point) {
            *sum += f64::from(value);
        }
    }
    let mut farthest_first: Vec<usize> = (0..labels.len()).collect();
    farthest_first.sort_by(|&a, &b| distances[b].total_cmp(&distances[a]));
    let mut relocations = farthest_first.into_iter();

    let mut centroids = vec![0.0f32; k * dim];
    for (cluster, centroid) in centroids.chunks_exact_mut(dim).enumerate() {
        if counts[cluster] > 0 {
            let scale = 1.0 / counts[cluster] as f64;
            for (value, sum) in centroid.iter_mut().zip(&sums[cluster * dim..]) {
                *value = (sum * scale) as f32;
            }
        } else if let Some(point) = relocations.next() {
            centroid.copy_from_slice(&points[point * dim..(point + 1) * dim]);
        }
    }
    centroids
}

/// Lloyd's iterations from `centroids` until the centres stop moving (squared shift <=
/// `tolerance`) or `max_iterations`; the labels are those of the final centres.
fn lloyd(
    points: &[f32],
    dim: usize,
    squared_norms: &[f32],
    mut centroids: Vec<f32>,
    max_iterations: usize,
    tolerance: f64,
) -> KMeansResult {
    let k = centroids.len() / dim;
    let point_count = squared_norms.len();
    let mut labels = vec![0usize; point_count];
    let mut distances = vec![0.0f32; point_count];
    let mut iterations = 0;
    for _ in 0..max_iterations {
        assign(
            points,
            dim,
            squared_norms,
            &centroids,
            &mut labels,
            &mut distances,
        );
        let updated = update_centroids(points, dim, &labels, &distances, k);
        let shift: f64 = updated
            .iter()
            .zip(&centroids)
            .map(|(&new, &old)| {
                let difference = f64::from(new) - f64::from(old);
                difference * difference
            })
            .sum();
        centroids = updated;
        iterations += 1;
        if shift <= tolerance {
            break;
        }
    }
    let inertia = assign(
        points,
        dim,
        squared_norms,
        &centroids,
        &mut labels,
        &mut distances,
    );
    KMeansResult {
        labels,
        centroids,
        k,
        inertia,
        iterations,
    }
}
