//! Segmentation files: the label map as a PNG of segment ids, masks as white-on-black PNGs, and the
//! segments as JSON. Every file is written atomically through [`write_atomically`].

use std::io::Write as _;
use std::path::Path;

use super::{Mask, SegmentInfo, SegmentMethod, Segmentation};
use crate::analysis::export::{write_atomically, ExportError, ExportResult};

/// What `segments.json` holds.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegmentsFile {
    /// The prompt the image was made from, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The clustering that made the segments.
    pub method: SegmentMethod,
    /// Width of the label map (and the masks) in pixels.
    pub width: usize,
    /// Height of the label map in pixels.
    pub height: usize,
    /// Every segment: id, label, scores, pixel count.
    pub segments: Vec<SegmentInfo>,
}

/// Writes the label map as a greyscale PNG whose pixel values are the segment ids (8-bit, or 16-bit
/// when there are more than 256 segments), at the segmentation's own size.
pub fn write_label_map_png(path: &Path, segmentation: &Segmentation) -> ExportResult<()> {
    if segmentation.labels.len() != segmentation.h * segmentation.w {
        return Err(ExportError::InvalidData {
            path: path.to_path_buf(),
            reason: format!(
                "label map has {} ids for {}x{}",
                segmentation.labels.len(),
                segmentation.h,
                segmentation.w
            ),
        });
    }
    if segmentation.segment_count <= 256 {
        let bytes: Vec<u8> = segmentation
            .labels
            .iter()
            .map(|&label| label.min(255) as u8)
            .collect();
        write_png_grey(
            path,
            segmentation.w,
            segmentation.h,
            png::BitDepth::Eight,
            &bytes,
        )
    } else {
        let bytes: Vec<u8> = segmentation
            .labels
            .iter()
            .flat_map(|&label| (label.min(usize::from(u16::MAX)) as u16).to_be_bytes())
            .collect();
        write_png_grey(
            path,
            segmentation.w,
            segmentation.h,
            png::BitDepth::Sixteen,
            &bytes,
        )
    }
}

/// Writes a mask as an 8-bit greyscale PNG, white inside, black outside, at the mask's size.
pub fn write_mask_png(path: &Path, mask: &Mask) -> ExportResult<()> {
    if mask.data.len() != mask.h * mask.w {
        return Err(ExportError::InvalidData {
            path: path.to_path_buf(),
            reason: format!(
                "mask has {} values for {}x{}",
                mask.data.len(),
                mask.h,
                mask.w
            ),
        });
    }
    write_png_grey(path, mask.w, mask.h, png::BitDepth::Eight, &mask.to_grey8())
}

/// Writes `segments.json` (pretty-printed).
pub fn write_segments_json(path: &Path, file: &SegmentsFile) -> ExportResult<()> {
    let text = serde_json::to_string_pretty(file).map_err(|error| ExportError::Encode {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    write_atomically(path, |writer| {
        writer.write_all(text.as_bytes())?;
        writer.write_all(b"\n")
    })
}

/// `mask_<id>_<label>.png`, with the label reduced to lower-case letters, digits, `-` and `_`
/// (anything else becomes `_`; an empty label becomes `segment`).
pub fn mask_file_name(segment_id: usize, label: &str) -> String {
    let mut safe: String = label
        .trim()
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
                character.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() {
        safe = "segment".to_string();
    }
    format!("mask_{segment_id}_{safe}.png")
}

/// A greyscale PNG of `w x h` samples (`bytes`: 1 byte per sample at 8 bits, 2 big-endian bytes at 16).
fn write_png_grey(
    path: &Path,
    w: usize,
    h: usize,
    depth: png::BitDepth,
    bytes: &[u8],
) -> ExportResult<()> {
    let invalid = |reason: String| ExportError::InvalidData {
        path: path.to_path_buf(),
        reason,
    };
    let (Ok(width), Ok(height)) = (u32::try_from(w), u32::try_from(h)) else {
        return Err(invalid(format!("image size {w}x{h} is too large for PNG")));
    };
    if width == 0 || height == 0 {
        return Err(invalid(format!("image size {w}x{h} is empty")));
    }
    let encode_error = |error: png::EncodingError| std::io::Error::other(error.to_string());
    write_atomically(path, |writer| {
        let mut encoder = png::Encoder::new(writer, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(depth);
        let mut png_writer = encoder.write_header().map_err(encode_error)?;
        png_writer.write_image_data(bytes).map_err(encode_error)?;
        png_writer.finish().map_err(encode_error)
    })
}
