//! File writing for the worker's plain exports (PNGs, session text), through [`crate::analysis::export`]
//! so every file is written atomically.

use std::io::Write as _;
use std::path::Path;

use crate::analysis::export::{write_atomically, write_png_rgb, ExportError};
use crate::worker::plain::RgbImage;

/// Writes `image` as a PNG at `path` atomically; `parameters` becomes an A1111 `parameters` text chunk.
pub fn write_png_file(
    path: &Path,
    image: &RgbImage,
    parameters: Option<&str>,
) -> Result<(), ExportError> {
    write_png_rgb(path, image.width, image.height, &image.pixels, parameters)
}

/// Writes `text` at `path` atomically.
pub fn write_text_file(path: &Path, text: &str) -> Result<(), ExportError> {
    write_atomically(path, |writer| writer.write_all(text.as_bytes()))
}
