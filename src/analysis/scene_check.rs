//! Judging generated drawn scenes: colour segmentation against the scene palette, connected regions,
//! and a shape test. Used by `attend eval-shapes`, the Prompt-to-Prompt and segmentation measurements.
//!
//! A pixel belongs to a palette colour when that colour is its nearest palette entry and the squared
//! RGB distance is below [`MAX_COLOUR_DISTANCE_SQ`]. An object is the largest 4-connected region of its
//! colour. Shapes are told apart by two scale-free numbers of the region: solidity (area / convex-hull
//! area: a star is about 0.55, the others about 1) and fill (area / bounding-box area: triangle 0.5,
//! circle 0.79, square 1).

use crate::scenes::{Colour, Shape};

/// Squared RGB distance under which a pixel counts as a palette colour (about 60 per channel).
pub const MAX_COLOUR_DISTANCE_SQ: u32 = 3 * 60 * 60;

/// Regions smaller than this many pixels do not count as a drawn object.
pub const MIN_OBJECT_PIXELS: usize = 12;

/// A region of one colour found in an image.
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectRegion {
    /// The palette colour.
    pub colour: Colour,
    /// `[h, w]` row-major, true inside the region.
    pub mask: Vec<bool>,
    /// Pixel count.
    pub area: usize,
    /// Centroid (x, y) in pixels.
    pub centroid_px: (f32, f32),
    /// The shape test's verdict.
    pub shape: Shape,
    /// Area / convex-hull area.
    pub solidity: f32,
    /// Area / bounding-box area.
    pub fill: f32,
}

/// Per pixel, the palette colour it belongs to (or `None`). `rgb` is `[h, w, 3]`.
pub fn palette_labels(rgb: &[u8], width: usize, height: usize) -> Vec<Option<Colour>> {
    (0..width * height)
        .map(|index| {
            let pixel = [rgb[index * 3], rgb[index * 3 + 1], rgb[index * 3 + 2]];
            let (colour, distance) = Colour::nearest(pixel);
            (distance <= MAX_COLOUR_DISTANCE_SQ).then_some(colour)
        })
        .collect()
}

/// The most common palette colour along the image border (the background), if any.
pub fn background_colour(labels: &[Option<Colour>], width: usize, height: usize) -> Option<Colour> {
    let mut counts = [0usize; Colour::ALL.len()];
    for y in 0..height {
        for x in 0..width {
            if x == 0 || y == 0 || x + 1 == width || y + 1 == height {
                if let Some(colour) = labels[y * width + x] {
                    counts[colour as usize] += 1;
                }
            }
        }
    }
    let (index, &count) = counts.iter().enumerate().max_by_key(|&(_, count)| *count)?;
    (count > 0).then(|| Colour::ALL[index])
}

/// The largest 4-connected region of `colour`, with its shape test, or `None` when it has fewer than
/// [`MIN_OBJECT_PIXELS`] pixels.
pub fn find_object(
    labels: &[Option<Colour>],
    width: usize,
    height: usize,
    colour: Colour,
) -> Option<ObjectRegion> {
    let mut seen = vec![false; width * height];
    let mut best: Option<Vec<usize>> = None;
    for start in 0..width * height {
        if seen[start] || labels[start] != Some(colour) {
            continue;
        }
        let mut component = Vec::new();
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(index) = stack.pop() {
            component.push(index);
            let (x, y) = (index % width, index / width);
            let mut visit = |nx: usize, ny: usize| {
                let neighbour = ny * width + nx;
                if !seen[neighbour] && labels[neighbour] == Some(colour) {
                    seen[neighbour] = true;
                    stack.push(neighbour);
                }
            };
            if x > 0 {
                visit(x - 1, y);
            }
            if x + 1 < width {
                visit(x + 1, y);
            }
            if y > 0 {
                visit(x, y - 1);
            }
            if y + 1 < height {
                visit(x, y + 1);
            }
        }
        if best.as_ref().is_none_or(|b| component.len() > b.len()) {
            best = Some(component);
        }
    }
    let pixels = best?;
    if pixels.len() < MIN_OBJECT_PIXELS {
        return None;
    }
    let mut mask = vec![false; width * height];
    pixels.iter().for_each(|&index| mask[index] = true);
    Some(region_from_mask(colour, mask, width, height))
}

/// Measures a region given by its mask.
pub fn region_from_mask(
    colour: Colour,
    mask: Vec<bool>,
    width: usize,
    height: usize,
) -> ObjectRegion {
    let mut area = 0usize;
    let (mut sum_x, mut sum_y) = (0.0f64, 0.0f64);
    let (mut min_x, mut min_y, mut max_x, mut max_y) = (usize::MAX, usize::MAX, 0usize, 0usize);
    let mut corners = Vec::new();
    for y in 0..height {
        for x in 0..width {
            if mask[y * width + x] {
                area += 1;
                sum_x += x as f64 + 0.5;
                sum_y += y as f64 + 0.5;
                min_x = min_x.min(x);
                min_y = min_y.min(y);
                max_x = max_x.max(x);
                max_y = max_y.max(y);
                for (cx, cy) in [(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)] {
                    corners.push((cx as i64, cy as i64));
                }
            }
        }
    }
    if area == 0 {
        return ObjectRegion {
            colour,
            mask,
            area,
            centroid_px: (0.0, 0.0),
            shape: Shape::Square,
            solidity: 0.0,
            fill: 0.0,
        };
    }
    let bbox_area = ((max_x - min_x + 1) * (max_y - min_y + 1)) as f32;
    let hull_area = convex_hull_area(&mut corners).max(1.0);
    let fill = area as f32 / bbox_area;
    let solidity = (area as f64 / hull_area) as f32;
    ObjectRegion {
        colour,
        mask,
        area,
        centroid_px: ((sum_x / area as f64) as f32, (sum_y / area as f64) as f32),
        shape: classify_shape(solidity, fill),
        solidity,
        fill,
    }
}

/// The shape test: non-convex regions are stars; convex ones are told apart by how much of their
/// bounding box they fill.
pub fn classify_shape(solidity: f32, fill: f32) -> Shape {
    if solidity < 0.78 {
        Shape::Star
    } else if fill < 0.64 {
        Shape::Triangle
    } else if fill < 0.9 {
        Shape::Circle
    } else {
        Shape::Square
    }
}

/// Area of the convex hull of integer points (monotone chain); sorts `points`.
fn convex_hull_area(points: &mut [(i64, i64)]) -> f64 {
    points.sort_unstable();
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| {
        (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
    };
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(points.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(i64, i64)>> = if pass == 0 {
            Box::new(points.iter())
        } else {
            Box::new(points.iter().rev())
        };
        for &point in iter {
            while hull.len() >= start + 2
                && cross(hull[hull.len() - 2], hull[hull.len() - 1], point) <= 0
            {
                hull.pop();
            }
            hull.push(point);
        }
        hull.pop();
    }
    let doubled: i64 = (0..hull.len())
        .map(|i| {
            let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
            a.0 * b.1 - b.0 * a.1
        })
        .sum();
    doubled.unsigned_abs() as f64 / 2.0
}

/// Intersection over union of two masks (0 when both are empty).
pub fn iou(a: &[bool], b: &[bool]) -> f32 {
    let intersection = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        0.0
    } else {
        intersection as f32 / union as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes::{generate_scene, SceneOptions};

    #[test]
    fn finds_every_object_of_generated_scenes_with_its_shape() {
        let options = SceneOptions::default();
        let (mut total, mut correct) = (0, 0);
        for seed in 0..200 {
            let scene = generate_scene(seed, &options);
            let labels = palette_labels(&scene.rgb, scene.size_px, scene.size_px);
            assert_eq!(
                background_colour(&labels, scene.size_px, scene.size_px),
                Some(scene.background)
            );
            for (object, truth) in scene.objects.iter().zip(&scene.masks) {
                total += 1;
                let Some(region) =
                    find_object(&labels, scene.size_px, scene.size_px, object.colour)
                else {
                    continue;
                };
                // Occluded objects may lose their shape; count how often the test is right.
                if region.shape == object.shape && iou(&region.mask, truth) > 0.8 {
                    correct += 1;
                }
            }
        }
        assert!(
            correct * 100 >= total * 95,
            "shape test right on {correct} of {total} drawn objects"
        );
    }

    #[test]
    fn iou_of_identical_and_disjoint_masks() {
        let a = [true, true, false, false];
        let b = [false, false, true, true];
        assert!((iou(&a, &a) - 1.0).abs() < 1e-6);
        assert!(iou(&a, &b).abs() < 1e-6);
        assert!(iou(&[false; 4], &[false; 4]).abs() < 1e-6);
    }
}
