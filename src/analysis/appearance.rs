//! Plain data of an appearance transfer (cross-image attention) that crosses the worker channel:
//! the masks the run matched objects with and where the output's pixels looked in the appearance
//! image ([`Correspondence`]).

use crate::analysis::heatmap::{resize_bilinear, Heatmap};
use crate::analysis::segment::Mask;

/// One named mask at image resolution: the segments of an image labelled with one word (or the
/// background label).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelledMask {
    /// The word that labels the segments (a prompt noun, or the background label).
    pub label: String,
    /// The union of those segments, `[h, w]` 0 / 1 at image resolution.
    pub mask: Mask,
}

/// The masks of both images, matched by label: entry `i` of `structure` and of `appearance` carry
/// the same label (the output's pixels inside `structure[i]` take the statistics of the
/// appearance's pixels inside `appearance[i]`). Empty when masked AdaIN was off or no label was
/// found in both images.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AppearanceMasks {
    /// The structure image's masks, one per matched label.
    pub structure: Vec<LabelledMask>,
    /// The appearance image's masks, in the same order.
    pub appearance: Vec<LabelledMask>,
}

/// Where the output looked in the appearance image: for each query cell of the output at the
/// finest attention grid, the appearance's attention averaged over heads, layers and the steps
/// that attended the appearance.
///
/// `top_key[q]` is the most-attended appearance cell of query `q` on the full key grid (the same
/// grid as the queries); `maps` keeps each query's map on a key grid pooled to at most
/// [`Correspondence::MAX_MAP_SIDE`] cells a side (so the record stays small at 512 px).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Correspondence {
    /// Query grid height (the output's finest self-attention grid; also the key grid).
    pub grid_h: usize,
    /// Query grid width.
    pub grid_w: usize,
    /// Image height in pixels.
    pub image_h: usize,
    /// Image width in pixels.
    pub image_w: usize,
    /// `[grid_h * grid_w]`: per query, the index `y * grid_w + x` of its most-attended appearance
    /// cell.
    pub top_key: Vec<u32>,
    /// Pooled key grid height.
    pub map_h: usize,
    /// Pooled key grid width.
    pub map_w: usize,
    /// `[grid_h * grid_w, map_h * map_w]`: per query, its mean attention over appearance cells
    /// (pooled by summing the keys of each pooled cell).
    pub maps: Vec<f32>,
    /// How many (step, layer) maps were averaged (0: the appearance was never attended).
    pub layer_calls: usize,
}

impl Correspondence {
    /// Largest side of the pooled key grid of [`Correspondence::maps`].
    pub const MAX_MAP_SIDE: usize = 32;

    /// Number of queries (`grid_h * grid_w`).
    pub fn queries(&self) -> usize {
        self.grid_h * self.grid_w
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.layer_calls == 0 || self.top_key.is_empty()
    }

    /// The query cell under image pixel `(y_px, x_px)`; `None` outside the image or when empty.
    pub fn query_at_pixel(&self, y_px: usize, x_px: usize) -> Option<usize> {
        if self.is_empty() || y_px >= self.image_h || x_px >= self.image_w {
            return None;
        }
        let y = y_px * self.grid_h / self.image_h;
        let x = x_px * self.grid_w / self.image_w;
        Some(y * self.grid_w + x)
    }

    /// The centre, in image pixels `(y_px, x_px)`, of the appearance cell query `query` attends
    /// most; `None` for a query outside the grid.
    pub fn top_pixel_for(&self, query: usize) -> Option<(usize, usize)> {
        let key = *self.top_key.get(query)? as usize;
        if self.grid_w == 0 || self.grid_h == 0 {
            return None;
        }
        let (y, x) = (key / self.grid_w, key % self.grid_w);
        let y_px = ((2 * y + 1) * self.image_h) / (2 * self.grid_h);
        let x_px = ((2 * x + 1) * self.image_w) / (2 * self.grid_w);
        Some((y_px.min(self.image_h - 1), x_px.min(self.image_w - 1)))
    }

    /// Query `query`'s attention over the appearance image at image resolution (bilinear from the
    /// pooled key grid), min-max normalised, its raw range kept in `floor` / `peak`; `None` for a
    /// query outside the grid or an empty record.
    pub fn map_for(&self, query: usize) -> Option<Heatmap> {
        let cells = self.map_h * self.map_w;
        if self.is_empty() || query >= self.queries() || cells == 0 {
            return None;
        }
        let row = self.maps.get(query * cells..(query + 1) * cells)?;
        let mut data = resize_bilinear(row, self.map_h, self.map_w, self.image_h, self.image_w);
        let floor = data.iter().copied().fold(f32::INFINITY, f32::min);
        let peak = data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let span = peak - floor;
        data.iter_mut().for_each(|value| {
            *value = if span > 0.0 {
                (*value - floor) / span
            } else {
                0.0
            }
        });
        Some(Heatmap {
            word: format!("query {}, {}", query / self.grid_w, query % self.grid_w),
            h: self.image_h,
            w: self.image_w,
            data,
            peak,
            floor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Correspondence {
        // 2x2 grid on a 4x4 image; query q attends key 3 - q.
        let mut maps = vec![0.0; 16];
        for query in 0..4 {
            maps[query * 4 + (3 - query)] = 1.0;
        }
        Correspondence {
            grid_h: 2,
            grid_w: 2,
            image_h: 4,
            image_w: 4,
            top_key: vec![3, 2, 1, 0],
            map_h: 2,
            map_w: 2,
            maps,
            layer_calls: 1,
        }
    }

    #[test]
    fn pixels_map_to_queries_and_back() {
        let record = record();
        assert_eq!(record.query_at_pixel(0, 0), Some(0));
        assert_eq!(record.query_at_pixel(3, 3), Some(3));
        assert_eq!(record.query_at_pixel(4, 0), None);
        assert_eq!(record.top_pixel_for(0), Some((3, 3)));
        assert_eq!(record.top_pixel_for(3), Some((1, 1)));
        assert_eq!(record.top_pixel_for(4), None);
        let map = record.map_for(0).unwrap();
        assert_eq!((map.h, map.w), (4, 4));
        assert!(map.data[15] > map.data[0]);
        assert!(record.map_for(4).is_none());
        assert!(Correspondence::default().map_for(0).is_none());
    }
}
