//! Segmentation files: the label map as a PNG of segment ids in their overlay colours, masks as
//! white-on-black PNGs, and the segments as JSON. Every file is written atomically through [`write_atomically`].

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

/// PNG text keyword of a label map that says how pixel values become segment ids.
pub const LABEL_MAP_KEYWORD: &str = "segment ids";

/// Writes the label map at the segmentation's own size, so that it both looks like the segments
/// and holds their ids exactly:
/// - up to 256 segments (always, for k at most [`super::MAX_SEGMENTS`]): an 8-bit indexed-colour
///   PNG whose palette index is the segment id and whose palette gives every id its
///   [`super::segment_colour`], the colours of `segments.png` and the editor's overlay. Image
///   viewers show the colours; read the indices (e.g. PIL's `Image.open(...)` in mode `P`, or
///   [`read_label_map_png`]) for the ids;
/// - more segments: a 16-bit greyscale PNG whose value is `id * step`, with `step` the largest
///   that keeps the last id within 65535 (spread over the grey range so the map is visible);
///   `step` is in the `segment ids` text chunk.
///
/// Both carry a `segment ids` text chunk ([`LABEL_MAP_KEYWORD`]) saying so.
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
    let segment_count = segmentation
        .labels
        .iter()
        .max()
        .map_or(0, |max| max + 1)
        .max(segmentation.segment_count);
    if segment_count <= 256 {
        let bytes: Vec<u8> = segmentation
            .labels
            .iter()
            .map(|&label| label.min(255) as u8)
            .collect();
        let palette: Vec<u8> = (0..segment_count.max(1))
            .flat_map(super::segment_colour)
            .collect();
        write_png(
            path,
            segmentation.w,
            segmentation.h,
            PngLayout::Indexed { palette },
            &bytes,
            Some("palette index = segment id; colours as in segments.png"),
        )
    } else {
        let step = u16::MAX as usize / (segment_count - 1).max(1);
        let bytes: Vec<u8> = segmentation
            .labels
            .iter()
            .flat_map(|&label| ((label * step).min(usize::from(u16::MAX)) as u16).to_be_bytes())
            .collect();
        write_png(
            path,
            segmentation.w,
            segmentation.h,
            PngLayout::Grey(png::BitDepth::Sixteen),
            &bytes,
            Some(&format!("16-bit grey value = segment id * {step}")),
        )
    }
}

/// Reads a label map written by [`write_label_map_png`] back into segment ids (`segment_count` is
/// one more than the largest id). Errors name the file.
pub fn read_label_map_png(path: &Path) -> ExportResult<Segmentation> {
    let invalid = |reason: String| ExportError::InvalidData {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|error| ExportError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|error| invalid(format!("not a readable PNG: {error}")))?;
    let buffer_size = reader
        .output_buffer_size()
        .ok_or_else(|| invalid("image too large".to_string()))?;
    let mut bytes = vec![0; buffer_size];
    let frame = reader
        .next_frame(&mut bytes)
        .map_err(|error| invalid(format!("not a readable PNG: {error}")))?;
    bytes.truncate(frame.buffer_size());
    let (w, h) = (frame.width as usize, frame.height as usize);
    let labels: Vec<usize> = match (frame.color_type, frame.bit_depth) {
        (png::ColorType::Indexed | png::ColorType::Grayscale, png::BitDepth::Eight) => {
            bytes.iter().map(|&value| usize::from(value)).collect()
        }
        (png::ColorType::Grayscale, png::BitDepth::Sixteen) => {
            let step = reader
                .info()
                .uncompressed_latin1_text
                .iter()
                .find(|chunk| chunk.keyword == LABEL_MAP_KEYWORD)
                .and_then(|chunk| chunk.text.rsplit(' ').next()?.parse::<usize>().ok())
                .filter(|&step| step > 0)
                .unwrap_or(1);
            bytes
                .chunks_exact(2)
                .map(|pair| usize::from(u16::from_be_bytes([pair[0], pair[1]])) / step)
                .collect()
        }
        (colour, depth) => {
            return Err(invalid(format!(
                "{colour:?} at {depth:?} is not a label map (expected 8-bit indexed or grey, or 16-bit grey)"
            )))
        }
    };
    if labels.len() != w * h {
        return Err(invalid(format!("{} ids for {w}x{h}", labels.len())));
    }
    let segment_count = labels.iter().max().map_or(0, |max| max + 1);
    Ok(Segmentation {
        h,
        w,
        labels,
        segment_count,
    })
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
    write_png(
        path,
        mask.w,
        mask.h,
        PngLayout::Grey(png::BitDepth::Eight),
        &mask.to_grey8(),
        None,
    )
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

/// How the samples of [`write_png`] are laid out.
enum PngLayout {
    /// Greyscale at this depth (1 byte per sample at 8 bits, 2 big-endian bytes at 16).
    Grey(png::BitDepth),
    /// 8-bit palette indices with this RGB palette (3 bytes per entry).
    Indexed { palette: Vec<u8> },
}

/// A greyscale or indexed PNG of `w x h` samples, with an optional `segment ids` text chunk.
fn write_png(
    path: &Path,
    w: usize,
    h: usize,
    layout: PngLayout,
    bytes: &[u8],
    label_text: Option<&str>,
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
        match &layout {
            PngLayout::Grey(depth) => {
                encoder.set_color(png::ColorType::Grayscale);
                encoder.set_depth(*depth);
            }
            PngLayout::Indexed { palette } => {
                encoder.set_color(png::ColorType::Indexed);
                encoder.set_depth(png::BitDepth::Eight);
                encoder.set_palette(palette.clone());
            }
        }
        if let Some(text) = label_text {
            encoder
                .add_text_chunk(LABEL_MAP_KEYWORD.to_string(), text.to_string())
                .map_err(encode_error)?;
        }
        let mut png_writer = encoder.write_header().map_err(encode_error)?;
        png_writer.write_image_data(bytes).map_err(encode_error)?;
        png_writer.finish().map_err(encode_error)
    })
}
