//! Self-attention segmentation on synthetic attention: block-structured self-attention must split
//! into its blocks (KMeans and DiffSeg), labels must follow the cross-attention, masks must have the
//! right size, dilation and feathering, and the files must read back. Then `attend segment` end to
//! end on one scene (the bundled model when present, else the tiny SD 1.x fixture).

// Test helpers unwrap like the tests themselves (clippy.toml only exempts #[test] functions).
#![allow(clippy::unwrap_used)]

use attend::analysis::heatmap::{Heatmap, SelfAttentionMap};
use attend::analysis::segment::{
    aggregate_self_attention, anchor_cells, binary_mask_to_mask, diffseg_segments,
    is_label_candidate, kmeans, kmeans_segments, label_segments, mask_file_name,
    read_label_map_png, segment_and_label, segment_colour, segment_self_attention, segments_mask,
    segments_with_label, symmetric_kl, write_label_map_png, write_mask_png, write_segments_json,
    CellAssignment, DiffSegSettings, KMeansSettings, LabelChoice, LabelSettings, MaskSettings,
    SegmentMethod, SegmentSettings, Segmentation, SegmentsFile, WordMapRef,
};

/// Region of every cell of a `side x side` grid: 0 background, 1 a square, 2 a disc, 3 a bar.
/// Boundaries fall on multiples of `side / 8`, so the same layout works at side/2.
fn block_regions(side: usize) -> Vec<usize> {
    let unit = side / 8;
    (0..side * side)
        .map(|index| {
            let (y, x) = (index / side, index % side);
            let (cy, cx) = (y / unit, x / unit);
            if (1..4).contains(&cy) && (1..4).contains(&cx) {
                1
            } else if (4..7).contains(&cy) && (4..7).contains(&cx) {
                2
            } else if cy == 7 && cx < 3 {
                3
            } else {
                0
            }
        })
        .collect()
}

/// A small deterministic noise source for the synthetic maps.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32) / (1u64 << 24) as f32
    }
}

/// Self-attention where each pixel looks mostly at its own region (uniform there, a bit more at its
/// neighbours), with a small leak everywhere and multiplicative noise. Rows sum to 1.
fn block_self_attention(regions: &[usize], side: usize, seed: u64) -> SelfAttentionMap {
    let cells = side * side;
    let mut noise = Noise(seed);
    let mut data = vec![0.0f32; cells * cells];
    for query in 0..cells {
        let (qy, qx) = ((query / side) as f32, (query % side) as f32);
        let row = &mut data[query * cells..(query + 1) * cells];
        for (key, value) in row.iter_mut().enumerate() {
            let (ky, kx) = ((key / side) as f32, (key % side) as f32);
            let same_region = regions[query] == regions[key];
            let distance_sq = (qy - ky).powi(2) + (qx - kx).powi(2);
            let local = (-distance_sq / (2.0 * (side as f32 / 8.0).powi(2))).exp();
            let base = if same_region { 1.0 + 0.5 * local } else { 0.01 };
            *value = base * (0.8 + 0.4 * noise.next());
        }
        let sum: f32 = row.iter().sum();
        row.iter_mut().for_each(|value| *value /= sum);
    }
    SelfAttentionMap {
        h: side,
        w: side,
        layer_count: 1,
        step_count: 1,
        data,
    }
}

/// True when `segmentation` partitions the grid exactly like `regions` (ids may differ).
fn same_partition(segmentation: &Segmentation, regions: &[usize]) -> bool {
    let region_count = regions.iter().max().map_or(0, |max| max + 1);
    if segmentation.segment_count != region_count {
        return false;
    }
    let mut segment_of_region = vec![None; region_count];
    for (&segment, &region) in segmentation.labels.iter().zip(regions) {
        match segment_of_region[region] {
            None => segment_of_region[region] = Some(segment),
            Some(known) if known != segment => return false,
            Some(_) => {}
        }
    }
    let mut used: Vec<usize> = segment_of_region.into_iter().flatten().collect();
    used.sort_unstable();
    used.dedup();
    used.len() == region_count
}

/// Fraction of cells where the segmentation's majority mapping to regions is right.
fn agreement(segmentation: &Segmentation, regions: &[usize]) -> f32 {
    let region_count = regions.iter().max().map_or(0, |max| max + 1);
    let mut counts = vec![vec![0usize; region_count]; segmentation.segment_count];
    for (&segment, &region) in segmentation.labels.iter().zip(regions) {
        counts[segment][region] += 1;
    }
    let correct: usize = counts
        .iter()
        .map(|row| row.iter().copied().max().unwrap_or(0))
        .sum();
    correct as f32 / regions.len() as f32
}

#[test]
fn kmeans_splits_block_attention_into_its_blocks() {
    let side = 16;
    let regions = block_regions(side);
    let map = block_self_attention(&regions, side, 7);
    let settings = KMeansSettings {
        k: 4,
        ..KMeansSettings::default()
    };
    let started = std::time::Instant::now();
    let segmentation = kmeans_segments(&map, &settings).unwrap();
    eprintln!(
        "kmeans 16x16 k=4 n_init=10: {} segments, agreement {:.3}, {:.1} ms",
        segmentation.segment_count,
        agreement(&segmentation, &regions),
        started.elapsed().as_secs_f64() * 1e3
    );
    assert!(same_partition(&segmentation, &regions));
    // Ids follow raster order: the top-left background is segment 0.
    assert_eq!(segmentation.labels[0], 0);

    // Deterministic for a seed.
    assert_eq!(kmeans_segments(&map, &settings).unwrap(), segmentation);

    // k = 5 over 4 blocks: local-prompt-mixing's KMeans splits one block, every segment staying
    // inside one block; attend's default merges the split halves back.
    let five = kmeans_segments(&map, &KMeansSettings::reference()).unwrap();
    assert_eq!(five.segment_count, 5);
    assert_eq!(agreement(&five, &regions), 1.0);
    let merged = kmeans_segments(&map, &KMeansSettings::default()).unwrap();
    assert!(same_partition(&merged, &regions));
    let eight = KMeansSettings {
        k: 8,
        ..KMeansSettings::default()
    };
    assert!(same_partition(
        &kmeans_segments(&map, &eight).unwrap(),
        &regions
    ));
}

#[test]
fn kmeans_dissolves_outline_slivers_but_keeps_small_objects() {
    // 32x32: background, a 10x10 object, a 4x4 object (1.6% of the grid) and an 8-cell sliver
    // along the big object's edge (0.8%), the kind of cluster KMeans makes of outline cells.
    let side = 32;
    let regions: Vec<usize> = (0..side * side)
        .map(|cell| {
            let (y, x) = (cell / side, cell % side);
            if (4..14).contains(&y) && (4..14).contains(&x) {
                1
            } else if y == 14 && (4..12).contains(&x) {
                2
            } else if (22..26).contains(&y) && (22..26).contains(&x) {
                3
            } else {
                0
            }
        })
        .collect();
    let map = block_self_attention(&regions, side, 11);
    let reference = KMeansSettings {
        k: 4,
        ..KMeansSettings::reference()
    };
    let kept = kmeans_segments(&map, &reference).unwrap();
    assert!(
        same_partition(&kept, &regions),
        "without dissolving the sliver is a segment"
    );
    let dissolved = kmeans_segments(
        &map,
        &KMeansSettings {
            k: 4,
            ..KMeansSettings::default()
        },
    )
    .unwrap();
    assert_eq!(dissolved.segment_count, 3);
    // Background, big object and small object keep one segment each (three different ones); the
    // sliver's cells joined them.
    let mut segment_of_region = [None; 4];
    for (&segment, &region) in dissolved.labels.iter().zip(&regions) {
        if region == 2 {
            continue;
        }
        let known = segment_of_region[region].get_or_insert(segment);
        assert_eq!(*known, segment, "region {region} is split");
    }
    let mut distinct: Vec<usize> = segment_of_region.iter().flatten().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
    // A fraction of 0 keeps every cluster.
    let none = KMeansSettings {
        k: 4,
        min_segment_fraction: Some(0.0),
        ..KMeansSettings::reference()
    };
    assert_eq!(kmeans_segments(&map, &none).unwrap().segment_count, 4);
}

#[test]
fn kmeans_finds_well_separated_clusters_and_checks_its_input() {
    // Three tight 2D clusters, given in a shuffled order.
    let centres = [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)];
    let mut noise = Noise(3);
    let mut points = Vec::new();
    let mut truth = Vec::new();
    for index in 0..90 {
        let cluster = (index * 7) % 3;
        points.push(centres[cluster].0 + noise.next() - 0.5);
        points.push(centres[cluster].1 + noise.next() - 0.5);
        truth.push(cluster);
    }
    let settings = KMeansSettings {
        k: 3,
        n_init: 3,
        ..KMeansSettings::default()
    };
    let result = kmeans(&points, 2, &settings).unwrap();
    let found = Segmentation::from_cluster_ids(1, 90, &result.labels).unwrap();
    assert!(same_partition(&found, &truth));
    assert!(result.inertia < 90.0 * 0.5, "inertia {}", result.inertia);

    assert!(kmeans(
        &points,
        2,
        &KMeansSettings {
            k: 0,
            ..settings.clone()
        }
    )
    .is_err());
    assert!(kmeans(
        &points,
        2,
        &KMeansSettings {
            k: 91,
            ..settings.clone()
        }
    )
    .is_err());
    assert!(kmeans(&points[..5], 2, &settings).is_err());
    let bad_map = SelfAttentionMap {
        h: 2,
        w: 2,
        layer_count: 1,
        step_count: 1,
        data: vec![0.25; 15],
    };
    let error = kmeans_segments(&bad_map, &settings).unwrap_err();
    assert!(error.to_string().contains("2x2"), "{error}");
}

#[test]
fn diffseg_finds_the_blocks_without_k() {
    let side = 16;
    let regions = block_regions(side);
    let map = block_self_attention(&regions, side, 11);
    let started = std::time::Instant::now();
    let segmentation =
        diffseg_segments(std::slice::from_ref(&map), &DiffSegSettings::default()).unwrap();
    eprintln!(
        "diffseg 16x16: {} segments, agreement {:.3}, {:.1} ms",
        segmentation.segment_count,
        agreement(&segmentation, &regions),
        started.elapsed().as_secs_f64() * 1e3
    );
    assert!(same_partition(&segmentation, &regions));

    // Without KMeans refinement, and with DiffSeg's own settings (absolute threshold 0.9, per-cell
    // argmax): the blocks are sharp enough for both.
    for settings in [
        DiffSegSettings {
            refine: false,
            ..DiffSegSettings::default()
        },
        DiffSegSettings::reference(),
        DiffSegSettings {
            cell_assignment: CellAssignment::ProposalArgmax,
            ..DiffSegSettings::default()
        },
    ] {
        let other = diffseg_segments(std::slice::from_ref(&map), &settings).unwrap();
        assert!(same_partition(&other, &regions), "{settings:?}");
    }
}

#[test]
fn diffseg_combines_resolutions() {
    let fine = block_self_attention(&block_regions(16), 16, 5);
    let coarse = block_self_attention(&block_regions(8), 8, 6);
    let maps = [coarse, fine];

    let aggregated = aggregate_self_attention(&maps, 16, 16).unwrap();
    assert_eq!((aggregated.h, aggregated.w), (16, 16));
    for row in aggregated.data.chunks_exact(256) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "row sum {sum}");
    }
    assert_eq!(aggregated.layer_count, 2);

    let started = std::time::Instant::now();
    let segmentation = diffseg_segments(&maps, &DiffSegSettings::default()).unwrap();
    let regions = block_regions(16);
    eprintln!(
        "diffseg 8x8 + 16x16: {} segments, agreement {:.3}, {:.1} ms",
        segmentation.segment_count,
        agreement(&segmentation, &regions),
        started.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!((segmentation.h, segmentation.w), (16, 16));
    // The coarse map's blur lets the small bar's proposal win a few cells next to it (DiffSeg's
    // argmax compares attention densities), so the blocks are found but not to the last cell.
    assert_eq!(segmentation.segment_count, 4);
    assert!(agreement(&segmentation, &regions) > 0.95);

    // The dispatching entry point picks the method.
    let settings = SegmentSettings {
        method: SegmentMethod::DiffSeg,
        ..SegmentSettings::default()
    };
    assert_eq!(
        segment_self_attention(&maps, &settings).unwrap(),
        segmentation
    );
    let kmeans_settings = SegmentSettings {
        kmeans: KMeansSettings {
            k: 4,
            ..KMeansSettings::default()
        },
        ..SegmentSettings::default()
    };
    let by_kmeans = segment_self_attention(&maps, &kmeans_settings).unwrap();
    assert_eq!(
        (by_kmeans.h, by_kmeans.w),
        (16, 16),
        "KMeans uses the largest grid"
    );
    assert!(segment_self_attention(&[], &settings).is_err());
}

#[test]
fn anchors_and_divergence_follow_diffseg() {
    // DiffSeg's 16 anchors on 64 cells.
    let anchors = anchor_cells(64, 64, 16);
    assert_eq!(anchors.len(), 256);
    // Rows and columns 1, 5, ..., 61; rows outer.
    let first_row: Vec<usize> = anchors[..16].to_vec();
    assert_eq!(
        first_row,
        (0..16).map(|index| 64 + 1 + 4 * index).collect::<Vec<_>>()
    );
    assert_eq!(anchors[16], 5 * 64 + 1);
    assert_eq!(anchors[255], 61 * 64 + 61);
    // On 32 cells: spacing 2, starting at 0; on 8 cells, every cell.
    assert_eq!(anchor_cells(32, 32, 16)[..3], [0, 2, 4]);
    assert_eq!(anchor_cells(32, 32, 16)[16], 2 * 32);
    assert_eq!(anchor_cells(8, 8, 16).len(), 64);

    let p = [0.5f32, 0.25, 0.25];
    let q = [0.25f32, 0.25, 0.5];
    // 0.5 * [(0.25)(ln 2) + 0 + (-0.25)(ln 0.5)] = 0.25 ln 2
    let expected = 0.25 * 2f32.ln();
    let measured = symmetric_kl(&p, &q);
    eprintln!("symmetric KL: {measured} vs {expected}");
    assert!((measured - expected).abs() < 1e-6);
    assert!((symmetric_kl(&p, &q) - symmetric_kl(&q, &p)).abs() < 1e-7);
    assert_eq!(symmetric_kl(&p, &p), 0.0);
}

/// Word maps at `side x side`: high over the word's region (with a soft falloff), low elsewhere.
fn word_map(regions: &[usize], side: usize, region: usize, word: &str) -> Heatmap {
    let mut noise = Noise(region as u64 + 100);
    let data = regions
        .iter()
        .map(|&cell_region| {
            let base = if cell_region == region { 0.9 } else { 0.05 };
            base + 0.1 * noise.next()
        })
        .collect();
    Heatmap {
        word: word.to_string(),
        h: side,
        w: side,
        data,
        peak: 1.0,
        floor: 0.0,
    }
}

/// Nearest upsampling of a region grid.
fn upsample_regions(regions: &[usize], side: usize, out_side: usize) -> Vec<usize> {
    (0..out_side * out_side)
        .map(|index| {
            let (y, x) = (index / out_side, index % out_side);
            regions[(y * side / out_side) * side + x * side / out_side]
        })
        .collect()
}

#[test]
fn labels_follow_the_cross_attention() {
    let side = 16;
    let regions = block_regions(side);
    let segmentation = kmeans_segments(
        &block_self_attention(&regions, side, 7),
        &KMeansSettings {
            k: 4,
            ..KMeansSettings::default()
        },
    )
    .unwrap();
    // Heat maps at image resolution (64x64) and one plain (text, map) pair at 8x8.
    let image_regions = upsample_regions(&regions, side, 64);
    let square = word_map(&image_regions, 64, 1, "square");
    let disc = word_map(&image_regions, 64, 2, "circle");
    let bar_regions = block_regions(8);
    let bar = word_map(&bar_regions, 8, 3, "bar");
    let words = [
        WordMapRef::from(&square),
        WordMapRef::from(&disc),
        WordMapRef::new("bar", 8, 8, &bar.data),
    ];
    let segments = label_segments(&segmentation, &words, &LabelSettings::default()).unwrap();
    assert_eq!(segments.len(), 4);

    let segment_of_region =
        |region: usize| segmentation.labels[regions.iter().position(|&r| r == region).unwrap()];
    let expected = ["background", "square", "circle", "bar"];
    for (region, expected_label) in expected.iter().enumerate() {
        let segment = &segments[segment_of_region(region)];
        eprintln!(
            "segment {} ({} cells): {} {:?}",
            segment.id,
            segment.pixel_count,
            segment.label,
            segment
                .scores
                .iter()
                .map(|score| format!("{} {:.2}", score.word, score.score))
                .collect::<Vec<_>>()
        );
        assert_eq!(&segment.label, expected_label);
        assert_eq!(
            segment.pixel_count,
            regions.iter().filter(|&&r| r == region).count()
        );
        assert_eq!(segment.scores.len(), 3);
        if region > 0 {
            assert!(segment.label_score() > 0.6);
            assert_eq!(segment.word_index, Some(region - 1));
        } else {
            assert_eq!(segment.word_index, None);
            assert!(segment.scores.iter().all(|score| score.score < 0.3));
        }
    }
    assert_eq!(
        segments_with_label(&segments, "square"),
        vec![segment_of_region(1)]
    );

    // A higher threshold turns everything into background; a custom background label is used.
    let strict = LabelSettings {
        threshold: 0.99,
        background_label: "rest".to_string(),
        ..LabelSettings::default()
    };
    let all_rest = label_segments(&segmentation, &words, &strict).unwrap();
    assert!(all_rest.iter().all(|segment| segment.label == "rest"));

    let broken = [WordMapRef::new("x", 4, 4, &[0.0; 3])];
    assert!(label_segments(&segmentation, &broken, &LabelSettings::default()).is_err());
}

/// Two words over the same segment: "cat" with strong raw attention there, "hat" with a map that is
/// higher once min-max normalised but has a seventh of the raw attention. The default
/// choice compares raw attention, local-prompt-mixing's rule the normalised scores.
#[test]
fn label_choice_compares_raw_attention_or_normalised_scores() {
    let segmentation = square_segmentation();
    let cells = segmentation.h * segmentation.w;
    let inside = |cell: usize| segmentation.labels[cell] == 1;
    let map = |high: f32, low: f32| -> Vec<f32> {
        (0..cells)
            .map(|cell| if inside(cell) { high } else { low })
            .collect()
    };
    // Inside the square "cat" alternates 0.9 and 0.5 (normalised mean 0.78, raw mean 0.7 * 2).
    let cat_data = map(0.9, 0.0)
        .into_iter()
        .enumerate()
        .map(|(cell, value)| {
            if cell % 2 == 1 && value > 0.0 {
                0.5
            } else {
                value
            }
        })
        .collect();
    let cat = Heatmap {
        word: "cat".to_string(),
        h: segmentation.h,
        w: segmentation.w,
        data: cat_data,
        peak: 2.0,
        floor: 0.0,
    };
    let hat = Heatmap {
        word: "hat".to_string(),
        data: map(1.0, 0.0),
        peak: 0.2,
        ..cat.clone()
    };
    let words = [WordMapRef::from(&cat), WordMapRef::from(&hat)];
    let label_of_segment_1 = |choice: LabelChoice| {
        let settings = LabelSettings {
            choice,
            ..LabelSettings::default()
        };
        let segments = label_segments(&segmentation, &words, &settings).unwrap();
        let scores = &segments[1].scores;
        assert!((scores[0].attention - 1.4).abs() < 1e-5, "{scores:?}");
        assert!((scores[1].attention - 0.2).abs() < 1e-5, "{scores:?}");
        assert_eq!(segments[0].label, "background");
        segments[1].label.clone()
    };
    assert_eq!(label_of_segment_1(LabelChoice::MostAttention), "cat");
    assert_eq!(label_of_segment_1(LabelChoice::HighestScore), "hat");
    // Raw attention decides only among words above the threshold.
    let mut weak_inside = map(0.2, 0.0);
    weak_inside[0] = 1.0;
    let weak_cat = Heatmap {
        data: weak_inside,
        peak: 5.0,
        ..cat.clone()
    };
    let words = [WordMapRef::from(&weak_cat), WordMapRef::from(&hat)];
    let segments = label_segments(&segmentation, &words, &LabelSettings::default()).unwrap();
    assert_eq!(segments[1].label, "hat");
    assert_eq!("highest-score".parse(), Ok(LabelChoice::HighestScore));
    assert!("loudest".parse::<LabelChoice>().is_err());
}

fn square_segmentation() -> Segmentation {
    // 8x8 grid, a 4x4 square at cells 2..6.
    let labels: Vec<usize> = (0..64)
        .map(|index| {
            let (y, x) = (index / 8, index % 8);
            usize::from((2..6).contains(&y) && (2..6).contains(&x))
        })
        .collect();
    Segmentation::from_cluster_ids(8, 8, &labels).unwrap()
}

/// Brute force: is pixel `(y, x)` within `radius` (Euclidean, centre to centre) of a `true` pixel?
fn near_mask(binary: &[bool], h: usize, w: usize, y: usize, x: usize, radius: f32) -> bool {
    let _ = h;
    binary.iter().enumerate().any(|(index, &inside)| {
        inside && {
            let dy = (index / w) as f32 - y as f32;
            let dx = (index % w) as f32 - x as f32;
            (dy * dy + dx * dx).sqrt() <= radius
        }
    })
}

#[test]
fn masks_upsample_dilate_and_feather() {
    let segmentation = square_segmentation();
    // 8x8 -> 32x32: the square covers pixels 8..24; bilinear upsampling + threshold 0.5 keeps the
    // straight edges exactly and rounds each corner by one pixel (0.625² < 0.5 there).
    let mask = segments_mask(&segmentation, &[1], 32, 32, &MaskSettings::default());
    assert_eq!((mask.h, mask.w), (32, 32));
    let inside_square = |y: usize, x: usize| (8..24).contains(&y) && (8..24).contains(&x);
    let corner = |y: usize, x: usize| (y == 8 || y == 23) && (x == 8 || x == 23);
    for y in 0..32 {
        for x in 0..32 {
            let expected = if inside_square(y, x) && !corner(y, x) {
                1.0
            } else {
                0.0
            };
            assert_eq!(mask.data[y * 32 + x], expected, "pixel ({y}, {x})");
        }
    }
    assert_eq!(mask.covered_pixels(), 256 - 4);
    // Both segments together cover everything; nothing selected covers nothing.
    assert_eq!(
        segments_mask(&segmentation, &[0, 1], 32, 32, &MaskSettings::default()).covered_pixels(),
        1024
    );
    assert_eq!(
        segments_mask(&segmentation, &[], 32, 32, &MaskSettings::default()).covered_pixels(),
        0
    );
    // A lower threshold grows the mask.
    let generous = MaskSettings {
        threshold: 0.1,
        ..MaskSettings::default()
    };
    assert!(segments_mask(&segmentation, &[1], 32, 32, &generous).covered_pixels() > 256);

    // Dilation by 3 px: exactly the pixels within Euclidean distance 3 of the mask.
    let base = mask.to_binary();
    let dilated = segments_mask(
        &segmentation,
        &[1],
        32,
        32,
        &MaskSettings {
            dilate_px: 3,
            ..MaskSettings::default()
        },
    );
    for y in 0..32 {
        for x in 0..32 {
            let expected = near_mask(&base, 32, 32, y, x, 3.0);
            assert_eq!(
                dilated.data[y * 32 + x] == 1.0,
                expected,
                "pixel ({y}, {x})"
            );
        }
    }
    eprintln!(
        "dilated by 3 px: {} pixels (mask 252)",
        dilated.covered_pixels()
    );

    // Erosion by 2 px: the 16x16 square loses 2 pixels per side.
    let eroded = segments_mask(
        &segmentation,
        &[1],
        32,
        32,
        &MaskSettings {
            dilate_px: -2,
            ..MaskSettings::default()
        },
    );
    assert_eq!(eroded.covered_pixels(), 12 * 12);

    // Feathering over 4 px: a ramp across the edge (0.5 on it), 1 deep inside, 0 far outside,
    // and about the same area.
    let feathered = segments_mask(
        &segmentation,
        &[1],
        32,
        32,
        &MaskSettings {
            feather_px: 4.0,
            ..MaskSettings::default()
        },
    );
    let row = |x: usize| feathered.data[16 * 32 + x];
    assert_eq!(row(16), 1.0);
    assert_eq!(row(0), 0.0);
    assert!(
        (row(8) - 0.625).abs() < 1e-6,
        "first inside pixel {}",
        row(8)
    );
    assert!(
        (row(7) - 0.375).abs() < 1e-6,
        "first outside pixel {}",
        row(7)
    );
    for x in 0..16 {
        assert!(row(x) <= row(x + 1), "the ramp rises towards the inside");
    }
    let area: f32 = feathered.data.iter().sum();
    eprintln!("feathered 4 px: area {area:.1} (hard mask 252)");
    assert!((area - 252.0).abs() < 8.0);
    assert!(feathered
        .data
        .iter()
        .all(|value| (0.0..=1.0).contains(value)));
    // Dilation and feathering combine: the ramp moves out with the edge.
    let both = segments_mask(
        &segmentation,
        &[1],
        32,
        32,
        &MaskSettings {
            dilate_px: 2,
            feather_px: 4.0,
            ..MaskSettings::default()
        },
    );
    assert!((both.data[16 * 32 + 6] - 0.625).abs() < 1e-6);
}

#[test]
fn dilation_matches_brute_force_on_a_random_mask() {
    let (h, w) = (23, 31);
    let mut noise = Noise(9);
    let binary: Vec<bool> = (0..h * w).map(|_| noise.next() < 0.05).collect();
    for radius in [1, 2, 4] {
        let mask = binary_mask_to_mask(&binary, h, w, radius, 0.0);
        for y in 0..h {
            for x in 0..w {
                let near = near_mask(&binary, h, w, y, x, radius as f32);
                assert_eq!(mask.data[y * w + x] == 1.0, near, "r {radius} ({y}, {x})");
            }
        }
    }
    // Shrinking the complement grows the mask by the same amount.
    let complement: Vec<bool> = binary.iter().map(|inside| !inside).collect();
    let grown = binary_mask_to_mask(&binary, h, w, 2, 0.0).to_binary();
    let shrunk = binary_mask_to_mask(&complement, h, w, -2, 0.0).to_binary();
    assert!(grown.iter().zip(&shrunk).all(|(a, b)| a != b));
}

#[test]
fn resized_segmentation_agrees_with_masks() {
    let segmentation = square_segmentation();
    let resized = segmentation.resized(32, 32);
    assert_eq!(resized.segment_count, 2);
    let mask = segments_mask(&segmentation, &[1], 32, 32, &MaskSettings::default());
    for (label, value) in resized.labels.iter().zip(&mask.data) {
        assert_eq!(*label == 1, *value == 1.0);
    }
    assert_eq!(resized.cell_counts(), vec![1024 - 252, 252]);
    assert_eq!(resized.segment_at_image_point(64, 64, 32, 32), Some(1));
    assert_eq!(segmentation.segment_at_image_point(64, 64, 2, 2), Some(0));
    assert_eq!(segmentation.segment_at_image_point(64, 64, 64, 2), None);
    assert_eq!(resized.colourised().len(), 32 * 32 * 3);
}

#[test]
fn files_round_trip() {
    let folder = tempfile::tempdir().unwrap();
    let segmentation = square_segmentation().resized(32, 32);
    let labels_path = folder.path().join("labels.png");
    write_label_map_png(&labels_path, &segmentation).unwrap();
    let read = read_label_map_png(&labels_path).unwrap();
    assert_eq!((read.w, read.h), (32, 32));
    assert_eq!(read.labels, segmentation.labels);
    // Viewers see every segment in its overlay colour (not ids 0 and 1, which look black).
    let image = image::open(&labels_path).unwrap().to_rgb8();
    for (pixel, &id) in image.pixels().zip(&segmentation.labels) {
        assert_eq!(pixel.0, segment_colour(id));
    }
    // More segments than a palette holds: 16-bit grey spread over the range, read back exactly.
    let many = Segmentation::from_cluster_ids(20, 20, &(0..400).collect::<Vec<_>>()).unwrap();
    write_label_map_png(&labels_path, &many).unwrap();
    let grey = image::open(&labels_path).unwrap().to_luma16();
    assert_eq!(grey.get_pixel(19, 19).0[0], 399 * (65535 / 399));
    assert_eq!(read_label_map_png(&labels_path).unwrap(), many);

    let mask = segments_mask(&segmentation, &[1], 32, 32, &MaskSettings::default());
    let mask_path = folder.path().join(mask_file_name(1, "Red circle!"));
    assert!(mask_path.ends_with("mask_1_red_circle_.png"));
    write_mask_png(&mask_path, &mask).unwrap();
    let mask_image = image::open(&mask_path).unwrap().to_luma8();
    let expected: Vec<u8> = mask
        .data
        .iter()
        .map(|&value| (value * 255.0) as u8)
        .collect();
    assert_eq!(mask_image.into_raw(), expected);

    let words = [WordMapRef::new("square", 8, 8, &[0.0; 64])];
    let segments = label_segments(&segmentation, &words, &LabelSettings::default()).unwrap();
    let file = SegmentsFile {
        prompt: Some("a red square".to_string()),
        method: SegmentMethod::KMeans,
        width: 32,
        height: 32,
        segments,
    };
    let json_path = folder.path().join("segments.json");
    write_segments_json(&json_path, &file).unwrap();
    let text = std::fs::read_to_string(&json_path).unwrap();
    let read: SegmentsFile = serde_json::from_str(&text).unwrap();
    assert_eq!(read, file);
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["method"], "kmeans");
    assert_eq!(value["segments"][1]["pixel_count"], 252);
    assert_eq!(value["segments"][1]["label"], "background");
    assert_eq!(value["segments"][1]["scores"][0]["word"], "square");
    // The label word's index is named for what it indexes (the competing words, `scores`); files
    // written with the old name still read.
    assert!(value["segments"][1].get("word_index").is_none(), "{value}");
    assert!(
        value["segments"][1].get("label_word_index").is_some(),
        "{value}"
    );
    let old_text = text.replace("label_word_index", "word_index");
    assert_eq!(
        serde_json::from_str::<SegmentsFile>(&old_text).unwrap(),
        file
    );
    assert_eq!(mask_file_name(3, ""), "mask_3_segment.png");
}

#[test]
fn both_methods_at_the_stored_32x32_size() {
    // The size attend stores by default (self-attention up to 32x32): time both methods there.
    let side = 32;
    let regions = block_regions(side);
    let map = block_self_attention(&regions, side, 21);
    let started = std::time::Instant::now();
    let by_kmeans = kmeans_segments(
        &map,
        &KMeansSettings {
            k: 4,
            ..KMeansSettings::default()
        },
    )
    .unwrap();
    let kmeans_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = std::time::Instant::now();
    let by_diffseg =
        diffseg_segments(std::slice::from_ref(&map), &DiffSegSettings::default()).unwrap();
    let diffseg_ms = started.elapsed().as_secs_f64() * 1e3;
    eprintln!(
        "32x32: kmeans {kmeans_ms:.0} ms (agreement {:.3}), diffseg {diffseg_ms:.0} ms \
         ({} segments, agreement {:.3})",
        agreement(&by_kmeans, &regions),
        by_diffseg.segment_count,
        agreement(&by_diffseg, &regions)
    );
    assert!(same_partition(&by_kmeans, &regions));
    assert!(same_partition(&by_diffseg, &regions));
}

#[test]
fn segment_and_label_gives_image_resolution_results() {
    let side = 16;
    let regions = block_regions(side);
    let map = block_self_attention(&regions, side, 7);
    let image_regions = upsample_regions(&regions, side, 64);
    let square = word_map(&image_regions, 64, 1, "square");
    let disc = word_map(&image_regions, 64, 2, "circle");
    let words = [WordMapRef::from(&square), WordMapRef::from(&disc)];
    for method in SegmentMethod::ALL {
        let settings = SegmentSettings {
            method,
            kmeans: KMeansSettings {
                k: 4,
                ..KMeansSettings::default()
            },
            ..SegmentSettings::default()
        };
        let result =
            segment_and_label(std::slice::from_ref(&map), &words, &settings, 64, 64).unwrap();
        assert_eq!(result.method, method);
        assert_eq!((result.grid.h, result.image.h), (16, 64));
        let square_ids = segments_with_label(&result.segments, "square");
        assert_eq!(square_ids.len(), 1, "{method}");
        // Clicking the middle of the square selects it; its mask is the square at 64x64.
        assert_eq!(result.segment_at_pixel(16, 16), Some(square_ids[0]));
        let mask = result.mask(&square_ids, &MaskSettings::default());
        let truth: Vec<bool> = image_regions.iter().map(|&region| region == 1).collect();
        let matching = mask
            .to_binary()
            .iter()
            .zip(&truth)
            .filter(|(a, b)| a == b)
            .count();
        eprintln!(
            "{method}: square mask matches {matching}/4096 pixels, {} segments",
            result.segments.len()
        );
        assert!(
            matching >= 4096 - 8,
            "only the 4 rounded corners may differ"
        );
        let total: usize = result.segments.iter().map(|s| s.pixel_count).sum();
        assert_eq!(total, 64 * 64);
    }
    assert!(segment_and_label(&[map], &words, &SegmentSettings::default(), 0, 64).is_err());
}

#[test]
fn label_candidates_skip_function_words_and_colours() {
    let prompt = "a photo of a red circle and an orange star on a white background";
    let kept: Vec<&str> = prompt
        .split(' ')
        .filter(|word| is_label_candidate(word))
        .collect();
    assert_eq!(kept, ["circle", "star", "background"]);
    assert!(is_label_candidate("Cat"));
    assert!(!is_label_candidate(","));
    assert!("parse".parse::<SegmentMethod>().is_err());
    assert_eq!(
        "DiffSeg".parse::<SegmentMethod>(),
        Ok(SegmentMethod::DiffSeg)
    );
}

/// The model for the end-to-end test: the bundled one when it is there, else the tiny SD 1.x
/// fixture (random weights: only the mechanics are checked then).
fn end_to_end_model() -> (std::path::PathBuf, &'static str, bool) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundled = root.join("assets/attend-shapes");
    if bundled.join("model_index.json").is_file() {
        (
            bundled,
            "a red circle and a blue square on a white background",
            true,
        )
    } else {
        (
            root.join("tests/fixtures/tiny-sd1"),
            "a photo of a cat wearing sunglasses",
            false,
        )
    }
}

/// Runs `attend segment` and checks every file it writes.
fn run_segment_command(extra: &[&str], steps: &str) -> (std::path::PathBuf, SegmentsFile) {
    let (model, prompt, _) = end_to_end_model();
    let out = tempfile::tempdir().unwrap().keep();
    let started = std::time::Instant::now();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_attend"))
        .args([
            "segment", "--prompt", prompt, "--seed", "3", "--steps", steps,
        ])
        .arg("--model")
        .arg(&model)
        .arg("--out-dir")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "attend segment {extra:?} on {} ({:.1} s):\n{stdout}{}",
        model.display(),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success());

    let image = image::open(out.join("image.png")).unwrap().to_rgb8();
    let (width, height) = image.dimensions();
    let labels = read_label_map_png(&out.join("labels.png")).unwrap();
    assert_eq!((labels.w, labels.h), (width as usize, height as usize));
    let overlay = image::open(out.join("segments.png")).unwrap();
    assert_eq!((overlay.width(), overlay.height()), (width, height));
    let file: SegmentsFile =
        serde_json::from_str(&std::fs::read_to_string(out.join("segments.json")).unwrap()).unwrap();
    assert_eq!((file.width, file.height), (width as usize, height as usize));
    assert_eq!(file.prompt.as_deref(), Some(prompt));
    let total: usize = file
        .segments
        .iter()
        .map(|segment| segment.pixel_count)
        .sum();
    assert_eq!(total, (width * height) as usize);
    for segment in &file.segments {
        let in_label_map = labels.labels.iter().filter(|&&id| id == segment.id).count();
        assert_eq!(in_label_map, segment.pixel_count, "segment {}", segment.id);
        let mask = image::open(out.join(mask_file_name(segment.id, &segment.label)))
            .unwrap()
            .to_luma8();
        assert_eq!(mask.dimensions(), (width, height));
        assert!(!segment.scores.is_empty());
        // A labelled segment says where its word sits among the prompt's words.
        if segment.word_index.is_some() {
            let position = segment.prompt_word_index.expect("prompt_word_index");
            assert_eq!(
                prompt.split_whitespace().nth(position),
                Some(segment.label.as_str()),
                "segment {}",
                segment.id
            );
        } else {
            assert_eq!(segment.prompt_word_index, None);
        }
        // One stdout line per segment: `segment <id> (<px> px): <label> [...]`.
        assert!(stdout.contains(&format!(
            "segment {} ({} px): {}",
            segment.id, segment.pixel_count, segment.label
        )));
    }
    (out, file)
}

#[test]
fn segment_command_end_to_end() {
    let (_, _, bundled) = end_to_end_model();
    let (out, file) = run_segment_command(&["--method", "kmeans", "--k", "4"], "8");
    assert_eq!(file.method, SegmentMethod::KMeans);
    // k = 4 at most: clusters with near-identical centres merge.
    assert!((2..=4).contains(&file.segments.len()));
    if bundled {
        // Only shape words and "background" compete by default (no colours, no articles).
        let words: Vec<&str> = file.segments[0]
            .scores
            .iter()
            .map(|score| score.word.as_str())
            .collect();
        assert_eq!(words, ["circle", "square", "background"]);
    }
    std::fs::remove_dir_all(out).unwrap();

    // DiffSeg with grown, feathered masks and chosen words.
    let words = if bundled {
        "circle,square"
    } else {
        "cat,sunglasses"
    };
    let (out, file) = run_segment_command(
        &[
            "--method",
            "diffseg",
            "--dilate-px",
            "2",
            "--feather-px",
            "1.5",
            "--words",
            words,
        ],
        "4",
    );
    assert_eq!(file.method, SegmentMethod::DiffSeg);
    assert!(!file.segments.is_empty());
    assert_eq!(file.segments[0].scores.len(), 2);
    // Feathered masks have soft values.
    let soft = file.segments.iter().any(|segment| {
        let mask = image::open(out.join(mask_file_name(segment.id, &segment.label)))
            .unwrap()
            .to_luma8();
        mask.pixels().any(|pixel| (1..255).contains(&pixel.0[0]))
    });
    assert!(soft || file.segments.len() == 1);
    std::fs::remove_dir_all(out).unwrap();
}
