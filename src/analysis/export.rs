//! Writing results to disk: PNG images (with A1111-style `parameters` text), heat maps, and the
//! attention maps as safetensors. Every file is written atomically: a crash or an error never leaves a
//! partial file at the destination, and only a regular file (or nothing) is ever replaced: see
//! [`write_atomically`] for devices, FIFOs, sockets, folders and symbolic links.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::analysis::colormap::Colormap;
use crate::analysis::heatmap::Heatmap;
use crate::analysis::WordSpan;

/// The PNG text keyword A1111 (and tools that read its images) use for generation parameters.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// Value of the `format` metadata entry of attention safetensors files.
pub const ATTENTION_FORMAT: &str = "attend.attention.v1";

/// Anything that can go wrong while exporting. Every variant names the destination path.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The file (or its temporary sibling) could not be created, written, synced or renamed.
    #[error("cannot write {path}: {error}")]
    Io {
        /// The destination path.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The data handed in does not fit what was asked (wrong buffer length, mismatched sizes).
    #[error("cannot export {path}: {reason}")]
    InvalidData {
        /// The destination path.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// The destination exists and is not a regular file (a folder, device, FIFO or socket), which an
    /// export never replaces.
    #[error(
        "cannot write {path}: it is {kind}, not a regular file; attend replaces only regular files"
    )]
    NotARegularFile {
        /// The destination path as given.
        path: PathBuf,
        /// What is there (`a folder`, `a character device`, `a FIFO (named pipe)`, ...).
        kind: &'static str,
    },
    /// The encoder refused the data.
    #[error("cannot encode {path}: {reason}")]
    Encode {
        /// The destination path.
        path: PathBuf,
        /// The encoder's message.
        reason: String,
    },
}

/// Result alias of the export module.
pub type ExportResult<T> = Result<T, ExportError>;

/// Makes temporary names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Deletes the temporary file when dropped, unless it was renamed into place.
struct TempFileGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempFileGuard {
    fn drop(&mut self) {
        if self.armed {
            // Best effort: the original error is what the caller needs to see.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Most symbolic links followed to reach a destination (as the kernel's own limit, 40).
const MAX_SYMLINK_HOPS: usize = 40;

/// What a non-regular file is, in words: `a folder`, `a FIFO (named pipe)`, ...
fn file_kind(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_socket() {
            return "a socket";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
    }
    "not a regular file"
}

/// The file an export to `path` really writes, checked before anything is written:
/// - nothing there, or a regular file: `path` itself;
/// - a symbolic link (or a chain of them): the file it points to, so the link survives and its
///   target is replaced atomically; a dangling link creates its target;
/// - anything else (a folder, a device node such as `/dev/full`, a FIFO, a socket; also behind a
///   link): [`ExportError::NotARegularFile`], naming `path` and what is there.
///
/// Call it before a long run to fail early; [`write_atomically`] calls it again before writing.
pub fn export_destination(path: &Path) -> ExportResult<PathBuf> {
    let io_error = |error| ExportError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut destination = path.to_path_buf();
    for _ in 0..=MAX_SYMLINK_HOPS {
        let metadata = match std::fs::symlink_metadata(&destination) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(destination),
            Err(error) => return Err(io_error(error)),
        };
        let file_type = metadata.file_type();
        if file_type.is_file() {
            return Ok(destination);
        }
        if !file_type.is_symlink() {
            return Err(ExportError::NotARegularFile {
                path: path.to_path_buf(),
                kind: file_kind(file_type),
            });
        }
        let target = std::fs::read_link(&destination).map_err(io_error)?;
        destination = match destination.parent() {
            Some(parent) if target.is_relative() => parent.join(target),
            _ => target,
        };
    }
    Err(ExportError::InvalidData {
        path: path.to_path_buf(),
        reason: format!("more than {MAX_SYMLINK_HOPS} symbolic links to follow (a loop?)"),
    })
}

/// Writes `path` atomically: `write` fills a temporary file in the same folder, which is then flushed,
/// synced to disk and renamed over `path`. On any error (or a panic in `write`) the temporary file is
/// removed, so `path` is either untouched or complete.
///
/// Only a regular file is ever replaced ([`export_destination`]): a folder, device node, FIFO or
/// socket at `path` is refused with [`ExportError::NotARegularFile`] before anything is written. A
/// symbolic link is followed: its target is written atomically (the temporary file sits next to
/// the target) and the link itself is kept. Errors name `path` as given.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> ExportResult<()> {
    let io_error = |error| ExportError::Io {
        path: path.to_path_buf(),
        error,
    };
    let destination = export_destination(path)?;
    let file_name = destination
        .file_name()
        .ok_or_else(|| ExportError::InvalidData {
            path: path.to_path_buf(),
            reason: "the path has no file name".to_string(),
        })?;
    let folder = match destination.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let temp_path = folder.join(temp_name);

    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(io_error)?;
    let mut guard = TempFileGuard {
        path: temp_path,
        armed: true,
    };
    let mut writer = BufWriter::new(file);
    write(&mut writer).map_err(io_error)?;
    let file = writer
        .into_inner()
        .map_err(|error| io_error(error.into_error()))?;
    file.sync_all().map_err(io_error)?;
    drop(file);
    std::fs::rename(&guard.path, &destination).map_err(io_error)?;
    guard.armed = false;
    sync_folder(&folder);
    Ok(())
}

/// Makes the rename durable (best effort: not every platform can open a folder for syncing).
fn sync_folder(folder: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = File::open(folder) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = folder;
}

/// Writes an 8-bit RGB PNG. `rgb` is `[h, w, 3]`. With `parameters`, adds a `parameters` text chunk as
/// A1111 does (tEXt when the text is Latin-1, iTXt otherwise), so other tools can read the settings.
pub fn write_png_rgb(
    path: &Path,
    w: usize,
    h: usize,
    rgb: &[u8],
    parameters: Option<&str>,
) -> ExportResult<()> {
    let invalid = |reason: String| ExportError::InvalidData {
        path: path.to_path_buf(),
        reason,
    };
    if rgb.len() != w * h * 3 {
        return Err(invalid(format!(
            "RGB buffer has {} bytes, expected {w} x {h} x 3 = {}",
            rgb.len(),
            w * h * 3
        )));
    }
    let (Ok(width), Ok(height)) = (u32::try_from(w), u32::try_from(h)) else {
        return Err(invalid(format!("image size {w}x{h} is too large for PNG")));
    };
    if width == 0 || height == 0 {
        return Err(invalid(format!("image size {w}x{h} is empty")));
    }
    let encode_error = |error: png::EncodingError| std::io::Error::other(error.to_string());
    write_atomically(path, |writer| {
        let mut encoder = png::Encoder::new(writer, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            let keyword = PARAMETERS_KEYWORD.to_string();
            if text.chars().all(|character| u32::from(character) <= 0xFF) {
                encoder
                    .add_text_chunk(keyword, text.to_string())
                    .map_err(encode_error)?;
            } else {
                encoder
                    .add_itxt_chunk(keyword, text.to_string())
                    .map_err(encode_error)?;
            }
        }
        let mut png_writer = encoder.write_header().map_err(encode_error)?;
        png_writer.write_image_data(rgb).map_err(encode_error)?;
        png_writer.finish().map_err(encode_error)
    })
}

/// Writes a heat map as a colour-mapped RGB PNG of its own size (values clamped to 0..1).
pub fn write_heatmap_png(
    path: &Path,
    heatmap: &Heatmap,
    colormap: Colormap,
    parameters: Option<&str>,
) -> ExportResult<()> {
    if heatmap.data.len() != heatmap.h * heatmap.w {
        return Err(ExportError::InvalidData {
            path: path.to_path_buf(),
            reason: format!(
                "heat map {:?} has {} values, expected {}x{}",
                heatmap.word,
                heatmap.data.len(),
                heatmap.h,
                heatmap.w
            ),
        });
    }
    let rgb: Vec<u8> = heatmap
        .data
        .iter()
        .flat_map(|&value| colormap.rgb(value))
        .collect();
    write_png_rgb(path, heatmap.w, heatmap.h, &rgb, parameters)
}

/// Writes the attention maps of a run as safetensors (f32, little-endian):
/// - `cross.<h>x<w>`: `[steps, tokens, h, w]` from
///   [`crate::attention::store::AttentionStore::cross_by_resolution`] (`tokens = tokens.len()`);
/// - `word_heatmaps`: `[words, H, W]`, the heat maps stacked (omitted when there are none);
///
/// and metadata `format` ([`ATTENTION_FORMAT`]), `words` (JSON list of the words), `word_tokens` (JSON
/// list of each word's token indices), `tokens` (JSON list of the token strings, start and end
/// included).
pub fn write_attention_safetensors(
    path: &Path,
    cross_by_resolution: &BTreeMap<(usize, usize), Vec<f32>>,
    word_heatmaps: &[Heatmap],
    words: &[WordSpan],
    tokens: &[String],
) -> ExportResult<()> {
    let invalid = |reason: String| ExportError::InvalidData {
        path: path.to_path_buf(),
        reason,
    };
    let token_count = tokens.len();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (&(h, w), data) in cross_by_resolution {
        let step_size = token_count * h * w;
        if step_size == 0 || data.len() % step_size != 0 {
            return Err(invalid(format!(
                "cross-attention at {h}x{w} has {} values, not a multiple of {token_count} tokens x {h} x {w}",
                data.len()
            )));
        }
        tensors.push((
            format!("cross.{h}x{w}"),
            vec![data.len() / step_size, token_count, h, w],
            f32_bytes(data),
        ));
    }
    if let Some(first) = word_heatmaps.first() {
        let (h, w) = (first.h, first.w);
        let mut stacked = Vec::with_capacity(word_heatmaps.len() * h * w);
        for heatmap in word_heatmaps {
            if (heatmap.h, heatmap.w) != (h, w) || heatmap.data.len() != h * w {
                return Err(invalid(format!(
                    "heat map {:?} is {}x{} with {} values, expected {h}x{w} like the first",
                    heatmap.word,
                    heatmap.h,
                    heatmap.w,
                    heatmap.data.len()
                )));
            }
            stacked.extend_from_slice(&heatmap.data);
        }
        tensors.push((
            "word_heatmaps".to_string(),
            vec![word_heatmaps.len(), h, w],
            f32_bytes(&stacked),
        ));
    }

    let to_json =
        |value: serde_json::Result<String>| value.map_err(|error| invalid(error.to_string()));
    let word_texts: Vec<&str> = words.iter().map(|word| word.text.as_str()).collect();
    let word_tokens: Vec<&[usize]> = words
        .iter()
        .map(|word| word.token_indices.as_slice())
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), ATTENTION_FORMAT.to_string()),
        (
            "words".to_string(),
            to_json(serde_json::to_string(&word_texts))?,
        ),
        (
            "word_tokens".to_string(),
            to_json(serde_json::to_string(&word_tokens))?,
        ),
        (
            "tokens".to_string(),
            to_json(serde_json::to_string(tokens))?,
        ),
    ]);

    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in &tensors {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|error| invalid(format!("tensor {name}: {error}")))?;
        views.push((name.as_str(), view));
    }
    let bytes = safetensors::tensor::serialize(views, Some(metadata)).map_err(|error| {
        ExportError::Encode {
            path: path.to_path_buf(),
            reason: error.to_string(),
        }
    })?;
    write_atomically(path, |writer| writer.write_all(&bytes))
}

/// Little-endian bytes of `values`.
fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// The settings of one generation, for [`a1111_parameters`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationParameters {
    /// The prompt as typed.
    pub prompt: String,
    /// The negative prompt; empty for none.
    pub negative_prompt: String,
    /// Denoising steps.
    pub steps: usize,
    /// Sampler name as A1111 spells it (`DDIM`, `Euler`, `DPM++ 2M`).
    pub sampler: String,
    /// Classifier-free guidance scale.
    pub cfg_scale: f32,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Model name (folder name).
    pub model: String,
    /// Further `key: value` entries appended after `Model` (attend's attention edits, for example).
    pub extra: Vec<(String, String)>,
}

/// The A1111 "infotext" for a generation:
/// `prompt\nNegative prompt: ...\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: ...`.
/// The negative prompt line is left out when it is empty, as A1111 does; values containing `,`, `:`
/// or a line break are JSON-quoted, as A1111 does.
pub fn a1111_parameters(parameters: &GenerationParameters) -> String {
    let mut text = parameters.prompt.clone();
    if !parameters.negative_prompt.is_empty() {
        text.push_str("\nNegative prompt: ");
        text.push_str(&parameters.negative_prompt);
    }
    let mut entries = vec![
        ("Steps".to_string(), parameters.steps.to_string()),
        ("Sampler".to_string(), parameters.sampler.clone()),
        ("CFG scale".to_string(), parameters.cfg_scale.to_string()),
        ("Seed".to_string(), parameters.seed.to_string()),
        (
            "Size".to_string(),
            format!("{}x{}", parameters.width, parameters.height),
        ),
        ("Model".to_string(), parameters.model.clone()),
    ];
    entries.extend(parameters.extra.iter().cloned());
    let line: Vec<String> = entries
        .iter()
        .map(|(key, value)| format!("{key}: {}", quote_value(value)))
        .collect();
    text.push('\n');
    text.push_str(&line.join(", "));
    text
}

/// A1111's `quote`: JSON-quote a value that would break the `key: value, ...` line.
fn quote_value(value: &str) -> String {
    if value.contains([',', ':', '\n']) {
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_entries(folder: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn sample_parameters() -> GenerationParameters {
        GenerationParameters {
            prompt: "a photo of a cat".to_string(),
            negative_prompt: "blurry".to_string(),
            steps: 20,
            sampler: "DDIM".to_string(),
            cfg_scale: 7.5,
            seed: 1,
            width: 64,
            height: 64,
            model: "tiny-sd1".to_string(),
            extra: Vec::new(),
        }
    }

    #[test]
    fn a1111_text_has_the_expected_layout() {
        let text = a1111_parameters(&sample_parameters());
        assert_eq!(
            text,
            "a photo of a cat\nNegative prompt: blurry\n\
             Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: tiny-sd1"
        );
        let mut parameters = sample_parameters();
        parameters.negative_prompt.clear();
        parameters.cfg_scale = 7.0;
        parameters.extra.push((
            "Attention edits".to_string(),
            "cat: 1.5, hat: 0.5".to_string(),
        ));
        let text = a1111_parameters(&parameters);
        assert_eq!(
            text,
            "a photo of a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, \
             Model: tiny-sd1, Attention edits: \"cat: 1.5, hat: 0.5\""
        );
    }

    #[test]
    fn unwritable_path_names_it_and_leaves_nothing() {
        let folder = tempfile::tempdir().unwrap();
        let missing = folder.path().join("no such folder").join("out.png");
        let error = write_png_rgb(&missing, 1, 1, &[0, 0, 0], None).unwrap_err();
        assert!(
            error.to_string().contains(&missing.display().to_string()),
            "{error}"
        );
        assert!(!missing.exists());
        assert!(folder_entries(folder.path()).is_empty());

        // The destination is a folder: the rename fails after the temporary file was written.
        let occupied = folder.path().join("occupied.png");
        std::fs::create_dir(&occupied).unwrap();
        std::fs::write(occupied.join("keep"), b"x").unwrap();
        let error = write_png_rgb(&occupied, 1, 1, &[0, 0, 0], None).unwrap_err();
        assert!(error.to_string().contains("occupied.png"), "{error}");
        assert_eq!(
            folder_entries(folder.path()),
            vec!["occupied.png".to_string()]
        );
    }

    #[test]
    fn failed_writer_leaves_no_file_and_keeps_the_old_one() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("data.bin");
        std::fs::write(&path, b"old").unwrap();
        let error = write_atomically(&path, |writer| {
            writer.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(error.to_string().contains("data.bin") && error.to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(folder_entries(folder.path()), vec!["data.bin".to_string()]);

        write_atomically(&path, |writer| writer.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(folder_entries(folder.path()), vec!["data.bin".to_string()]);
    }

    fn read_png(path: &Path) -> (png::OutputInfo, Vec<u8>, Vec<(String, String)>) {
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        reader.finish().unwrap();
        let png_info = reader.info();
        let mut texts: Vec<(String, String)> = png_info
            .uncompressed_latin1_text
            .iter()
            .map(|chunk| (chunk.keyword.clone(), chunk.text.clone()))
            .collect();
        for chunk in &png_info.utf8_text {
            texts.push((chunk.keyword.clone(), chunk.get_text().unwrap()));
        }
        pixels.truncate(info.buffer_size());
        (info, pixels, texts)
    }

    #[test]
    fn png_round_trip_keeps_pixels_and_parameters() {
        let folder = tempfile::tempdir().unwrap();
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|value| value as u8 * 10).collect();
        let parameters = a1111_parameters(&sample_parameters());
        let path = folder.path().join("image.png");
        write_png_rgb(&path, 3, 2, &rgb, Some(&parameters)).unwrap();
        let (info, pixels, texts) = read_png(&path);
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(pixels, rgb);
        assert_eq!(texts, vec![(PARAMETERS_KEYWORD.to_string(), parameters)]);

        let unicode = "a cat in Kyoto, 猫\nSteps: 1";
        write_png_rgb(&path, 3, 2, &rgb, Some(unicode)).unwrap();
        let (_, _, texts) = read_png(&path);
        assert_eq!(
            texts,
            vec![(PARAMETERS_KEYWORD.to_string(), unicode.to_string())]
        );

        let error = write_png_rgb(&path, 4, 2, &rgb, None).unwrap_err();
        assert!(matches!(error, ExportError::InvalidData { .. }), "{error}");
    }

    #[test]
    fn heatmap_png_uses_the_colormap() {
        let folder = tempfile::tempdir().unwrap();
        let heatmap = Heatmap {
            word: "cat".to_string(),
            h: 1,
            w: 2,
            data: vec![0.0, 1.0],
            peak: 3.0,
            floor: 0.0,
        };
        let path = folder.path().join("cat.png");
        write_heatmap_png(&path, &heatmap, Colormap::Grey, None).unwrap();
        let (_, pixels, texts) = read_png(&path);
        assert_eq!(pixels, vec![0, 0, 0, 255, 255, 255]);
        assert!(texts.is_empty());
    }

    #[test]
    fn safetensors_round_trip() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("attention.safetensors");
        let tokens: Vec<String> = ["<|startoftext|>", "cat</w>", "<|endoftext|>"]
            .map(String::from)
            .to_vec();
        let words = vec![WordSpan {
            text: "cat".to_string(),
            token_indices: vec![1],
        }];
        // 2 steps x 3 tokens x 2 x 2, and 2 steps x 3 tokens x 1 x 1.
        let cross_2x2: Vec<f32> = (0..24).map(|value| value as f32 * 0.5).collect();
        let cross_1x1: Vec<f32> = (0..6).map(|value| value as f32).collect();
        let cross = BTreeMap::from([((2, 2), cross_2x2.clone()), ((1, 1), cross_1x1)]);
        let heatmaps = vec![Heatmap {
            word: "cat".to_string(),
            h: 2,
            w: 3,
            data: vec![0.25; 6],
            peak: 1.0,
            floor: 0.0,
        }];
        write_attention_safetensors(&path, &cross, &heatmaps, &words, &tokens).unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let cross_view = file.tensor("cross.2x2").unwrap();
        assert_eq!(cross_view.shape(), &[2, 3, 2, 2]);
        let values: Vec<f32> = cross_view
            .data()
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
            .collect();
        assert_eq!(values, cross_2x2);
        assert_eq!(file.tensor("cross.1x1").unwrap().shape(), &[2, 3, 1, 1]);
        assert_eq!(file.tensor("word_heatmaps").unwrap().shape(), &[1, 2, 3]);

        let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = metadata.metadata().clone().unwrap();
        assert_eq!(metadata["format"], ATTENTION_FORMAT);
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&metadata["words"]).unwrap(),
            vec!["cat"]
        );
        assert_eq!(
            serde_json::from_str::<Vec<Vec<usize>>>(&metadata["word_tokens"]).unwrap(),
            vec![vec![1]]
        );
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&metadata["tokens"]).unwrap(),
            tokens
        );

        let bad = BTreeMap::from([((2, 2), vec![0.0; 5])]);
        let error = write_attention_safetensors(&path, &bad, &[], &words, &tokens).unwrap_err();
        assert!(
            error.to_string().contains("attention.safetensors"),
            "{error}"
        );
    }
}
