//! Plain-data values that cross the worker channel: images and attention maps as `Vec`s with shapes.
//! The attention map types are [`crate::analysis::heatmap`]'s, re-exported here.

pub use crate::analysis::heatmap::{
    CrossGroup, Heatmap, SelfAttentionMap, SelfAttentionSpan, StepCross,
};

/// An 8-bit RGB image, `[height, width, 3]` row-major.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `[height, width, 3]` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// A black image of the given size.
    pub fn black(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            pixels: vec![0; width * height * 3],
        }
    }

    /// True when `pixels` holds exactly `width * height * 3` bytes.
    pub fn is_consistent(&self) -> bool {
        self.pixels.len() == self.width * self.height * 3
    }
}
