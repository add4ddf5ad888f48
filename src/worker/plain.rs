//! Plain-data values that cross the worker channel: images and attention maps as `Vec`s with shapes.
//! The attention map and image types are [`crate::analysis`]'s, re-exported here.

pub use crate::analysis::heatmap::{
    CrossGroup, Heatmap, SelfAttentionMap, SelfAttentionSpan, StepCross,
};

pub use crate::analysis::image::RgbImage;
