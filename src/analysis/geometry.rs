//! Plain geometry behind the editor's canvas: fitting an image into a pane, from 0..1 image
//! coordinates to grid cells, bilinear sampling like the shader, segment label positions and the
//! outlines of segments and masks. Points are `(y, x)` in 0..1 image coordinates unless said
//! otherwise; outline segments are `[(x0, y0), (x1, y1)]` in cell-corner coordinates of their grid
//! (multiply by the image size over the grid size to place them).

use crate::analysis::segment::Segmentation;

/// The largest `(width, height)` with `aspect` (width / height) inside `available` `(width, height)`
/// (each side at least 1).
pub fn fit_size(available: (f32, f32), aspect: f32) -> (f32, f32) {
    let (width, height) = (available.0.max(1.0), available.1.max(1.0));
    if width / height > aspect {
        (height * aspect, height)
    } else {
        (width, width / aspect)
    }
}

/// The cell `(row, column)` of an `h x w` grid under `point` (`(y, x)` in 0..1, clamped to the grid).
/// `None` for an empty grid.
pub fn cell_at(point: (f32, f32), h: usize, w: usize) -> Option<(usize, usize)> {
    if h == 0 || w == 0 {
        return None;
    }
    let row = ((point.0.clamp(0.0, 1.0) * h as f32) as usize).min(h - 1);
    let column = ((point.1.clamp(0.0, 1.0) * w as f32) as usize).min(w - 1);
    Some((row, column))
}

/// The value of an `[height, width]` grid at `point` (`(y, x)` in 0..1), interpolated between cell
/// centres like the heat map shader (clamped at the edges). 0 for an empty grid.
pub fn sample_bilinear(values: &[f32], height: usize, width: usize, point: (f32, f32)) -> f32 {
    if height == 0 || width == 0 {
        return 0.0;
    }
    let position = |uv: f32, size: usize| (uv * size as f32 - 0.5).max(0.0);
    let (py, px) = (position(point.0, height), position(point.1, width));
    let (y0, x0) = ((py as usize).min(height - 1), (px as usize).min(width - 1));
    let (y1, x1) = ((y0 + 1).min(height - 1), (x0 + 1).min(width - 1));
    let (fy, fx) = (py - y0 as f32, px - x0 as f32);
    let at = |y: usize, x: usize| values.get(y * width + x).copied().unwrap_or(0.0);
    let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
    let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Where each segment's label goes: the cell of `grid` farthest from the segment's edge (other
/// segments and the grid border), `(y, x)` in 0..1; `None` for a segment with no cell.
/// One entry per segment id below `segment_count`.
pub fn label_points(grid: &Segmentation, segment_count: usize) -> Vec<Option<(f32, f32)>> {
    let (h, w) = (grid.h, grid.w);
    let at = |y: usize, x: usize| grid.labels.get(y * w + x).copied();
    // Cells with a neighbour in another segment.
    let mut edge_cells = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let label = at(y, x);
            let differs = (y > 0 && at(y - 1, x) != label)
                || (y + 1 < h && at(y + 1, x) != label)
                || (x > 0 && at(y, x - 1) != label)
                || (x + 1 < w && at(y, x + 1) != label);
            if differs {
                edge_cells.push((y as f32, x as f32));
            }
        }
    }
    let mut best: Vec<Option<(f32, usize)>> = vec![None; segment_count];
    for y in 0..h {
        for x in 0..w {
            let Some(label) = at(y, x) else {
                continue;
            };
            let (fy, fx) = (y as f32, x as f32);
            // Distance to the border counts like distance to another segment.
            let border = (fy + 1.0)
                .min(fx + 1.0)
                .min(h as f32 - fy)
                .min(w as f32 - fx)
                .powi(2);
            let to_edge = edge_cells
                .iter()
                .filter(|&&(ey, ex)| at(ey as usize, ex as usize) != Some(label))
                .map(|&(ey, ex)| (ey - fy).powi(2) + (ex - fx).powi(2))
                .fold(border, f32::min);
            if let Some(slot) = best.get_mut(label) {
                if slot.is_none_or(|(distance, _)| to_edge > distance) {
                    *slot = Some((to_edge, y * w + x));
                }
            }
        }
    }
    best.into_iter()
        .map(|found| {
            found.map(|(_, cell)| {
                (
                    ((cell / w) as f32 + 0.5) / h as f32,
                    ((cell % w) as f32 + 0.5) / w as f32,
                )
            })
        })
        .collect()
}

/// The edges between cells of different segments, merged into straight runs.
pub fn segment_outlines(labels: &Segmentation) -> Vec<[(f32, f32); 2]> {
    let (h, w) = (labels.h, labels.w);
    let at = |y: usize, x: usize| labels.labels.get(y * w + x).copied();
    boundary_runs(h, w, |a, b| match (a, b) {
        (Some((ay, ax)), Some((by, bx))) => at(ay, ax) != at(by, bx),
        // The grid border is no outline.
        _ => false,
    })
}

/// The outline of the cells of an `[h, w]` mask at or above `threshold`, the grid border included,
/// merged into straight runs.
pub fn mask_outline(data: &[f32], h: usize, w: usize, threshold: f32) -> Vec<[(f32, f32); 2]> {
    let inside = |cell: Option<(usize, usize)>| {
        cell.is_some_and(|(y, x)| data.get(y * w + x).is_some_and(|&value| value >= threshold))
    };
    boundary_runs(h, w, |a, b| inside(a) != inside(b))
}

/// The edges between neighbouring cells where `differs(a, b)` holds (`None`: outside the grid),
/// merged down each column and along each row.
fn boundary_runs(
    h: usize,
    w: usize,
    differs: impl Fn(Option<(usize, usize)>, Option<(usize, usize)>) -> bool,
) -> Vec<[(f32, f32); 2]> {
    let cell = |y: usize, x: Option<usize>| x.filter(|&x| x < w && y < h).map(|x| (y, x));
    let mut lines = Vec::new();
    // Vertical edges (between x - 1 and x), merged down each column.
    for x in 0..=w {
        let mut start: Option<usize> = None;
        for y in 0..=h {
            let edge = y < h && differs(cell(y, x.checked_sub(1)), cell(y, Some(x)));
            match (edge, start) {
                (true, None) => start = Some(y),
                (false, Some(first)) => {
                    lines.push([(x as f32, first as f32), (x as f32, y as f32)]);
                    start = None;
                }
                _ => {}
            }
        }
    }
    // Horizontal edges (between y - 1 and y), merged along each row.
    for y in 0..=h {
        let mut start: Option<usize> = None;
        for x in 0..=w {
            let above = y.checked_sub(1).and_then(|above| cell(above, Some(x)));
            let edge = x < w && differs(above, cell(y, Some(x)));
            match (edge, start) {
                (true, None) => start = Some(x),
                (false, Some(first)) => {
                    lines.push([(first as f32, y as f32), (x as f32, y as f32)]);
                    start = None;
                }
                _ => {}
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(h: usize, w: usize, labels: Vec<usize>, segment_count: usize) -> Segmentation {
        Segmentation {
            h,
            w,
            labels,
            segment_count,
        }
    }

    #[test]
    fn label_points_lie_inside_their_segments() {
        // A 6x6 grid: a 2x2 block (segment 1) inside a background (segment 0).
        let mut labels = vec![0usize; 36];
        for (y, x) in [(2, 3), (2, 4), (3, 3), (3, 4)] {
            labels[y * 6 + x] = 1;
        }
        let grid = grid(6, 6, labels, 2);
        let points = label_points(&grid, 2);
        for (id, point) in points.iter().enumerate() {
            let (y, x) = point.unwrap();
            let cell = grid.segment_at((y * 6.0) as usize, (x * 6.0) as usize);
            assert_eq!(cell, Some(id));
        }
    }

    #[test]
    fn outlines_follow_the_edges_between_segments() {
        // Left half 0, right half 1 on a 4x4 grid: one vertical line at x = 2, full height.
        let labels = (0..16).map(|cell| usize::from(cell % 4 >= 2)).collect();
        let lines = segment_outlines(&grid(4, 4, labels, 2));
        assert_eq!(lines, vec![[(2.0, 0.0), (2.0, 4.0)]]);
    }

    #[test]
    fn a_mask_outline_closes_at_the_border() {
        // The right column of a 3x2 mask: a line down its left side, the border on the other three.
        let data = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0];
        let mut lines = mask_outline(&data, 3, 2, 0.5);
        lines.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(
            lines,
            vec![
                [(1.0, 0.0), (1.0, 3.0)],
                [(1.0, 0.0), (2.0, 0.0)],
                [(1.0, 3.0), (2.0, 3.0)],
                [(2.0, 0.0), (2.0, 3.0)],
            ]
        );
    }

    #[test]
    fn points_map_to_cells_and_samples_interpolate() {
        assert_eq!(cell_at((0.0, 0.0), 4, 8), Some((0, 0)));
        assert_eq!(cell_at((1.0, 1.0), 4, 8), Some((3, 7)));
        assert_eq!(cell_at((0.5, 0.26), 4, 8), Some((2, 2)));
        assert_eq!(cell_at((0.5, 0.5), 0, 8), None);
        let values = [0.0, 1.0];
        assert_eq!(sample_bilinear(&values, 1, 2, (0.5, 0.25)), 0.0);
        assert_eq!(sample_bilinear(&values, 1, 2, (0.5, 0.75)), 1.0);
        assert!((sample_bilinear(&values, 1, 2, (0.5, 0.5)) - 0.5).abs() < 1e-6);
        assert_eq!(fit_size((200.0, 100.0), 1.0), (100.0, 100.0));
        assert_eq!(fit_size((100.0, 200.0), 2.0), (100.0, 50.0));
    }
}
