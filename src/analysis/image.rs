//! Images as plain data: the one 8-bit RGB type every layer shares, and bringing a user's image
//! in (decode PNG / JPEG / WebP of any colour type to RGB, a decompression-bomb limit, fitting to the
//! model's size by crop, pad or stretch).

use std::path::Path;

use crate::analysis::{AnalysisError, AnalysisResult};

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

/// How an image of another size is fitted to the model's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageFit {
    /// Scale to cover the target, then cut the overflow equally on both sides (the default).
    #[default]
    Crop,
    /// Scale to fit inside the target, then fill the borders (mid grey).
    Pad,
    /// Scale each side independently (the aspect ratio changes).
    Stretch,
}

/// Where the source image landed in the fitted one, in fitted pixels (for showing the fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImagePlacement {
    /// How it was fitted.
    pub fit: ImageFit,
    /// The source's size in pixels.
    pub source_size_px: (usize, usize),
    /// The part of the source that is visible: `(x, y, width, height)` in source pixels.
    pub visible_source_rect: (usize, usize, usize, usize),
    /// Where that part lies in the fitted image: `(x, y, width, height)` in fitted pixels.
    pub fitted_rect: (usize, usize, usize, usize),
}

/// An image fitted to a target size, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FittedImage {
    /// The fitted image, exactly the target size.
    pub image: RgbImage,
    /// How the source maps onto it.
    pub placement: ImagePlacement,
}

/// The largest image attend decodes, in pixels (width x height): a decompression-bomb limit
/// checked from the header before any pixel is decoded.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;

/// Reads a PNG, JPEG or WebP file of any colour type (grey, alpha, 16-bit, palette) as RGB.
/// Errors name the file and what is wrong (not an image, truncated, too large).
pub fn read_image(path: &Path) -> AnalysisResult<RgbImage> {
    let _ = path;
    Err(AnalysisError::InvalidArgument {
        name: "image",
        reason: "reading images is not built yet".to_string(),
    })
}

/// Fits `image` to `width` x `height` pixels with `fit` (bilinear-quality resampling).
pub fn fit_image(
    image: &RgbImage,
    width: usize,
    height: usize,
    fit: ImageFit,
) -> AnalysisResult<FittedImage> {
    let _ = (image, width, height, fit);
    Err(AnalysisError::InvalidArgument {
        name: "image",
        reason: "fitting images is not built yet".to_string(),
    })
}

/// A stable content hash of an image (size and pixels), as 16 hex digits: the key of cached
/// inversions and the check that a reopened session has the same pixels.
pub fn image_hash(image: &RgbImage) -> String {
    // FNV-1a, 64 bits, over the size then the pixels.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let size = [image.width as u64, image.height as u64];
    for byte in size
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .chain(image.pixels.iter().copied())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
