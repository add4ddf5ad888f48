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
///
/// The format is guessed from the file's first bytes (not its extension). The size is read from the
/// header and checked against [`MAX_IMAGE_PIXELS`] before any pixel is decoded. Transparent
/// pixels are composited over white (what an image viewer shows), so a cut-out object keeps its
/// silhouette instead of the undefined colours under alpha 0; 16-bit channels are rounded to 8 bits.
pub fn read_image(path: &Path) -> AnalysisResult<RgbImage> {
    let format = guess_image_format(path)?;
    let (width, height) = open_image(path, format)?
        .into_dimensions()
        .map_err(|error| image_error(path, format, &error))?;
    check_image_pixels(path, width, height)?;
    let mut reader = open_image(path, format)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 16-bit RGBA is the largest decoded form, plus the converted copy.
    limits.max_alloc = Some(MAX_IMAGE_PIXELS.saturating_mul(16));
    reader.limits(limits);
    let decoded = reader
        .decode()
        .map_err(|error| image_error(path, format, &error))?;
    Ok(composite_on_white(&decoded))
}

/// Opens `path` for decoding as `format`.
fn open_image(
    path: &Path,
    format: image::ImageFormat,
) -> AnalysisResult<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path)
        .map_err(|error| bad_image(path, format!("cannot be opened: {error}")))?;
    Ok(image::ImageReader::with_format(
        std::io::BufReader::new(file),
        format,
    ))
}

/// The file's format from its first bytes (never its extension): PNG, JPEG or WebP, anything
/// else refused.
fn guess_image_format(path: &Path) -> AnalysisResult<image::ImageFormat> {
    use std::io::Read;
    let mut start = Vec::with_capacity(64);
    std::fs::File::open(path)
        .and_then(|file| file.take(64).read_to_end(&mut start))
        .map_err(|error| bad_image(path, format!("cannot be opened: {error}")))?;
    match image::guess_format(&start) {
        Ok(
            format
            @ (image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP),
        ) => Ok(format),
        Ok(other) => Err(bad_image(
            path,
            format!(
                "is a {other:?} image; attend reads PNG, JPEG and WebP (convert it to PNG first)"
            ),
        )),
        Err(_) => Err(bad_image(
            path,
            "is not an image (not a PNG, JPEG or WebP file)".to_string(),
        )),
    }
}

/// Refuses a header that claims more than [`MAX_IMAGE_PIXELS`] (or an empty image).
fn check_image_pixels(path: &Path, width: u32, height: u32) -> AnalysisResult<()> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(bad_image(
            path,
            format!("is empty ({width}x{height} pixels)"),
        ));
    }
    if pixels > MAX_IMAGE_PIXELS {
        return Err(bad_image(
            path,
            format!(
                "is too large: {width}x{height} = {pixels} pixels, attend reads at most \
                 {MAX_IMAGE_PIXELS} (scale it down first)"
            ),
        ));
    }
    Ok(())
}

/// The decoder's error in words a user can act on.
fn image_error(
    path: &Path,
    format: image::ImageFormat,
    error: &image::ImageError,
) -> AnalysisError {
    let reason = match error {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("is truncated (the {format:?} data ends early)")
        }
        image::ImageError::Limits(limit) => format!("is too large to decode: {limit}"),
        image::ImageError::Decoding(decoding) => {
            format!("is a damaged or truncated {format:?} file: {decoding}")
        }
        image::ImageError::Unsupported(unsupported) => {
            format!("uses a {format:?} feature attend cannot decode: {unsupported}")
        }
        other => format!("cannot be decoded as {format:?}: {other}"),
    };
    bad_image(path, reason)
}

fn bad_image(path: &Path, reason: String) -> AnalysisError {
    AnalysisError::InvalidArgument {
        name: "image",
        reason: format!("{} {reason}", path.display()),
    }
}

/// Any decoded colour type as 8-bit RGB; alpha composited over white.
fn composite_on_white(decoded: &image::DynamicImage) -> RgbImage {
    let width = decoded.width() as usize;
    let height = decoded.height() as usize;
    if !decoded.color().has_alpha() {
        return RgbImage {
            width,
            height,
            pixels: decoded.to_rgb8().into_raw(),
        };
    }
    let rgba = decoded.to_rgba16();
    let mut pixels = Vec::with_capacity(width * height * 3);
    for pixel in rgba.pixels() {
        let [red, green, blue, alpha] = pixel.0.map(u32::from);
        for channel in [red, green, blue] {
            // channel * alpha + white * (1 - alpha), in 16 bits, then rounded to 8 bits.
            let composited = (channel * alpha + 65_535 * (65_535 - alpha) + 32_767) / 65_535;
            pixels.push(((composited * 255 + 32_767) / 65_535) as u8);
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// The grey of [`ImageFit::Pad`]'s borders (mid grey, 0 in the model's `[-1, 1]` range).
pub const PAD_GREY: u8 = 128;

/// Fits `image` to `width` x `height` pixels with `fit`. Resampling is Lanczos-3 when shrinking
/// and Catmull-Rom when enlarging (sharp, without Lanczos' ringing on upscaled edges); a source
/// already of the target size is returned unchanged.
pub fn fit_image(
    image: &RgbImage,
    width: usize,
    height: usize,
    fit: ImageFit,
) -> AnalysisResult<FittedImage> {
    if !image.is_consistent() || image.width == 0 || image.height == 0 {
        return Err(AnalysisError::InvalidArgument {
            name: "image",
            reason: format!(
                "a {}x{} image with {} bytes (expected {} and a non-empty size)",
                image.width,
                image.height,
                image.pixels.len(),
                image.width * image.height * 3
            ),
        });
    }
    if width == 0 || height == 0 {
        return Err(AnalysisError::InvalidArgument {
            name: "fitted size",
            reason: format!("{width}x{height} pixels; both sides must be at least 1"),
        });
    }
    let (source_width, source_height) = (image.width, image.height);
    let full_source = (0, 0, source_width, source_height);
    let (visible_source_rect, fitted_rect) = match fit {
        ImageFit::Stretch => (full_source, (0, 0, width, height)),
        ImageFit::Crop => {
            // Cover: the source part with the target's aspect ratio, centred.
            let (crop_width, crop_height) = if source_width * height > width * source_height {
                (
                    ((source_height * width) as f64 / height as f64).round() as usize,
                    source_height,
                )
            } else {
                (
                    source_width,
                    ((source_width * height) as f64 / width as f64).round() as usize,
                )
            };
            let crop_width = crop_width.clamp(1, source_width);
            let crop_height = crop_height.clamp(1, source_height);
            (
                (
                    (source_width - crop_width) / 2,
                    (source_height - crop_height) / 2,
                    crop_width,
                    crop_height,
                ),
                (0, 0, width, height),
            )
        }
        ImageFit::Pad => {
            // Contain: the whole source scaled to fit, centred.
            let (inner_width, inner_height) = if source_width * height > width * source_height {
                (
                    width,
                    ((source_height * width) as f64 / source_width as f64).round() as usize,
                )
            } else {
                (
                    ((source_width * height) as f64 / source_height as f64).round() as usize,
                    height,
                )
            };
            let inner_width = inner_width.clamp(1, width);
            let inner_height = inner_height.clamp(1, height);
            (
                full_source,
                (
                    (width - inner_width) / 2,
                    (height - inner_height) / 2,
                    inner_width,
                    inner_height,
                ),
            )
        }
    };
    let visible = crop(image, visible_source_rect);
    let resized = resize(&visible, fitted_rect.2, fitted_rect.3)?;
    let fitted = if (fitted_rect.2, fitted_rect.3) == (width, height) {
        resized
    } else {
        let mut canvas = RgbImage {
            width,
            height,
            pixels: vec![PAD_GREY; width * height * 3],
        };
        let (left, top, inner_width, _) = fitted_rect;
        for (row_index, row) in resized.pixels.chunks_exact(inner_width * 3).enumerate() {
            let start = ((top + row_index) * width + left) * 3;
            canvas.pixels[start..start + inner_width * 3].copy_from_slice(row);
        }
        canvas
    };
    Ok(FittedImage {
        image: fitted,
        placement: ImagePlacement {
            fit,
            source_size_px: (source_width, source_height),
            visible_source_rect,
            fitted_rect,
        },
    })
}

/// The `(x, y, width, height)` part of `image` (inside it).
fn crop(image: &RgbImage, (left, top, width, height): (usize, usize, usize, usize)) -> RgbImage {
    if (left, top, width, height) == (0, 0, image.width, image.height) {
        return image.clone();
    }
    let mut pixels = Vec::with_capacity(width * height * 3);
    for row in top..top + height {
        let start = (row * image.width + left) * 3;
        pixels.extend_from_slice(&image.pixels[start..start + width * 3]);
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// `image` resampled to `width` x `height` (unchanged when already that size).
fn resize(image: &RgbImage, width: usize, height: usize) -> AnalysisResult<RgbImage> {
    if (image.width, image.height) == (width, height) {
        return Ok(image.clone());
    }
    let too_large = || AnalysisError::InvalidArgument {
        name: "fitted size",
        reason: format!("{width}x{height} pixels does not fit 32-bit sides"),
    };
    let buffer = image::RgbImage::from_raw(
        u32::try_from(image.width).map_err(|_| too_large())?,
        u32::try_from(image.height).map_err(|_| too_large())?,
        image.pixels.clone(),
    )
    .ok_or_else(|| AnalysisError::InvalidArgument {
        name: "image",
        reason: "its pixel buffer does not match its size".to_string(),
    })?;
    let shrinking = width * height < image.width * image.height;
    let filter = if shrinking {
        image::imageops::FilterType::Lanczos3
    } else {
        image::imageops::FilterType::CatmullRom
    };
    let resized = image::imageops::resize(
        &buffer,
        u32::try_from(width).map_err(|_| too_large())?,
        u32::try_from(height).map_err(|_| too_large())?,
        filter,
    );
    Ok(RgbImage {
        width,
        height,
        pixels: resized.into_raw(),
    })
}

/// How far one 8-bit image is from another of the same size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageDifference {
    /// Peak signal-to-noise ratio in dB over the RGB values; infinite for identical images.
    pub psnr_db: f64,
    /// Mean absolute difference per RGB value (0..255).
    pub mean_abs: f64,
}

/// The PSNR and mean absolute difference of `image` against `reference` (reconstructions against
/// their input). Images of different sizes, or with inconsistent or no pixels, are an error.
pub fn image_difference(image: &RgbImage, reference: &RgbImage) -> AnalysisResult<ImageDifference> {
    if (image.width, image.height) != (reference.width, reference.height)
        || !image.is_consistent()
        || !reference.is_consistent()
        || image.pixels.is_empty()
    {
        return Err(AnalysisError::InvalidArgument {
            name: "image",
            reason: format!(
                "cannot compare a {}x{} image with a {}x{} one",
                image.width, image.height, reference.width, reference.height
            ),
        });
    }
    let count = image.pixels.len() as f64;
    let (squared, absolute) = image
        .pixels
        .iter()
        .zip(&reference.pixels)
        .map(|(&a, &b)| f64::from(a) - f64::from(b))
        .fold((0.0, 0.0), |(squared, absolute), difference| {
            (
                squared + difference * difference,
                absolute + difference.abs(),
            )
        });
    let mse = squared / count;
    let psnr_db = if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    };
    Ok(ImageDifference {
        psnr_db,
        mean_abs: absolute / count,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn temp_file(dir: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
        dir.path().join(name)
    }

    fn error_text(result: AnalysisResult<RgbImage>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn every_colour_type_reads_as_rgb8() {
        let dir = tempfile::tempdir().unwrap();
        // Grey 8 and 16 bits.
        let grey = image::GrayImage::from_raw(2, 1, vec![0, 200]).unwrap();
        let path = temp_file(&dir, "grey.png");
        grey.save(&path).unwrap();
        assert_eq!(read_image(&path).unwrap().pixels, [0, 0, 0, 200, 200, 200]);
        let grey16 =
            image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0u16, 65_535]).unwrap();
        let path = temp_file(&dir, "grey16.png");
        grey16.save(&path).unwrap();
        assert_eq!(read_image(&path).unwrap().pixels, [0, 0, 0, 255, 255, 255]);
        // RGB 16 bits: rounded to the nearest 8-bit value.
        let rgb16 =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![257u16 * 10, 0, 65_535])
                .unwrap();
        let path = temp_file(&dir, "rgb16.png");
        rgb16.save(&path).unwrap();
        assert_eq!(read_image(&path).unwrap().pixels, [10, 0, 255]);
        // Alpha: opaque keeps its colour, transparent is white, half is halfway to white.
        let rgba =
            image::RgbaImage::from_raw(3, 1, vec![10, 20, 30, 255, 10, 20, 30, 0, 0, 0, 0, 128])
                .unwrap();
        let path = temp_file(&dir, "rgba.png");
        rgba.save(&path).unwrap();
        assert_eq!(
            read_image(&path).unwrap().pixels,
            [10, 20, 30, 255, 255, 255, 127, 127, 127]
        );
        // Grey with alpha.
        let grey_alpha =
            image::ImageBuffer::<image::LumaA<u8>, _>::from_raw(1, 1, vec![0u8, 0]).unwrap();
        let path = temp_file(&dir, "grey_alpha.png");
        grey_alpha.save(&path).unwrap();
        assert_eq!(read_image(&path).unwrap().pixels, [255, 255, 255]);
        // Palette (indexed) PNG, written with the png crate.
        let path = temp_file(&dir, "palette.png");
        {
            let file = std::fs::File::create(&path).unwrap();
            let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 2, 1);
            encoder.set_color(png::ColorType::Indexed);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_palette(vec![255, 0, 0, 0, 0, 255]);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[1, 0]).unwrap();
        }
        assert_eq!(read_image(&path).unwrap().pixels, [0, 0, 255, 255, 0, 0]);
    }

    #[test]
    fn jpeg_and_webp_read() {
        let dir = tempfile::tempdir().unwrap();
        let flat = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 50]));
        for name in ["flat.jpg", "flat.webp"] {
            let path = temp_file(&dir, name);
            flat.save(&path).unwrap();
            let read = read_image(&path).unwrap();
            assert_eq!((read.width, read.height), (8, 8));
            // JPEG is lossy: a flat colour comes back within a few levels.
            for (read, expected) in read.pixels.iter().zip(flat.as_raw()) {
                assert!(
                    read.abs_diff(*expected) <= 3,
                    "{name}: {read} vs {expected}"
                );
            }
        }
        // The format comes from the content, not the extension.
        let path = temp_file(&dir, "really_a_png.jpg");
        flat.save_with_format(&path, image::ImageFormat::Png)
            .unwrap();
        assert_eq!(read_image(&path).unwrap().pixels, *flat.as_raw());
    }

    #[test]
    fn broken_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let text = temp_file(&dir, "notes.png");
        std::fs::write(&text, "just some text, no image").unwrap();
        let message = error_text(read_image(&text));
        assert!(
            message.contains("notes.png") && message.contains("not an image"),
            "{message}"
        );

        let image = image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
        let whole = temp_file(&dir, "whole.png");
        image.save(&whole).unwrap();
        let bytes = std::fs::read(&whole).unwrap();
        let truncated = temp_file(&dir, "cut.png");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let message = error_text(read_image(&truncated));
        assert!(
            message.contains("cut.png") && message.contains("truncated"),
            "{message}"
        );

        let missing = temp_file(&dir, "absent.png");
        let message = error_text(read_image(&missing));
        assert!(message.contains("absent.png"), "{message}");
    }

    #[test]
    fn a_header_over_the_pixel_limit_is_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = temp_file(&dir, "bomb.png");
        {
            // A valid 1 x 1 PNG whose header is changed to claim 30000 x 30000 pixels (with its
            // checksum fixed): the data that follows is far too short, as in a decompression bomb
            // only the header is read.
            let mut bytes = Vec::new();
            {
                let mut encoder = png::Encoder::new(&mut bytes, 1, 1);
                encoder.set_color(png::ColorType::Rgb);
                let mut writer = encoder.write_header().unwrap();
                writer.write_image_data(&[1, 2, 3]).unwrap();
            }
            // Signature (8), IHDR length and type (8), then width and height.
            bytes[16..20].copy_from_slice(&30_000u32.to_be_bytes());
            bytes[20..24].copy_from_slice(&30_000u32.to_be_bytes());
            let checksum = crc32(&bytes[12..29]);
            bytes[29..33].copy_from_slice(&checksum.to_be_bytes());
            std::fs::write(&path, bytes).unwrap();
        }
        let message = error_text(read_image(&path));
        assert!(
            message.contains("bomb.png")
                && message.contains("too large")
                && message.contains("30000x30000"),
            "{message}"
        );
    }

    /// The CRC-32 of PNG chunks (over the chunk type and data).
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn gradient(width: usize, height: usize) -> RgbImage {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for x in 0..width {
                pixels.extend_from_slice(&[(x * 255 / width) as u8, (y * 255 / height) as u8, 77]);
            }
        }
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn crop_covers_and_centres() {
        let fitted = fit_image(&gradient(200, 100), 32, 32, ImageFit::Crop).unwrap();
        assert_eq!((fitted.image.width, fitted.image.height), (32, 32));
        assert_eq!(fitted.placement.visible_source_rect, (50, 0, 100, 100));
        assert_eq!(fitted.placement.fitted_rect, (0, 0, 32, 32));
        assert_eq!(fitted.placement.source_size_px, (200, 100));
        // The middle half of a horizontal ramp: red runs from about 64 to about 191.
        let first_red = fitted.image.pixels[16 * 32 * 3];
        let last_red = fitted.image.pixels[(16 * 32 + 31) * 3];
        assert!((55..75).contains(&first_red), "{first_red}");
        assert!((180..200).contains(&last_red), "{last_red}");
        // A tall image loses its top and bottom.
        let tall = fit_image(&gradient(10, 40), 20, 20, ImageFit::Crop).unwrap();
        assert_eq!(tall.placement.visible_source_rect, (0, 15, 10, 10));
    }

    #[test]
    fn pad_fits_inside_with_grey_borders() {
        let fitted = fit_image(&gradient(200, 100), 32, 32, ImageFit::Pad).unwrap();
        assert_eq!(fitted.placement.fitted_rect, (0, 8, 32, 16));
        assert_eq!(fitted.placement.visible_source_rect, (0, 0, 200, 100));
        let pixel =
            |x: usize, y: usize| &fitted.image.pixels[(y * 32 + x) * 3..(y * 32 + x) * 3 + 3];
        assert_eq!(pixel(5, 0), [PAD_GREY; 3]);
        assert_eq!(pixel(5, 31), [PAD_GREY; 3]);
        assert_eq!(pixel(5, 12)[2], 77);
    }

    #[test]
    fn stretch_uses_the_whole_image_and_same_size_is_unchanged() {
        let source = gradient(40, 10);
        let fitted = fit_image(&source, 16, 16, ImageFit::Stretch).unwrap();
        assert_eq!(fitted.placement.visible_source_rect, (0, 0, 40, 10));
        assert_eq!(fitted.placement.fitted_rect, (0, 0, 16, 16));
        assert_eq!(fitted.image.pixels.len(), 16 * 16 * 3);
        for fit in [ImageFit::Crop, ImageFit::Pad, ImageFit::Stretch] {
            assert_eq!(fit_image(&source, 40, 10, fit).unwrap().image, source);
        }
    }

    #[test]
    fn bad_fit_inputs_are_refused() {
        let broken = RgbImage {
            width: 2,
            height: 2,
            pixels: vec![0; 5],
        };
        assert!(fit_image(&broken, 4, 4, ImageFit::Crop).is_err());
        assert!(fit_image(&gradient(4, 4), 0, 4, ImageFit::Pad).is_err());
    }
}
