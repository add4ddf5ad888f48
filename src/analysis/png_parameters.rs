//! Reading the generation settings back from a PNG's `parameters` text chunk, the A1111 "infotext"
//! that attend writes ([`crate::analysis::export::a1111_parameters`]) and AUTOMATIC1111, Forge,
//! SD.Next and others write:
//!
//! ```text
//! a photo of a cat, (masterpiece:1.2)
//! more prompt on a second line
//! Negative prompt: blurry, lowres
//! Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 12345, Size: 512x768, Model: v1-5
//! ```
//!
//! The last line is the settings line when it holds at least three `key: value` entries (values with
//! `,` or `:` are JSON-quoted); the lines before it are the prompt, up to a line starting with
//! `Negative prompt:`, and the negative prompt.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use crate::analysis::export::PARAMETERS_KEYWORD;
use crate::analysis::{AnalysisError, AnalysisResult};

/// The settings read from a `parameters` text. Absent settings are `None`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PngParameters {
    /// The prompt (lines joined with `\n`).
    pub prompt: String,
    /// The negative prompt; empty when there is none.
    pub negative_prompt: String,
    /// `Steps`.
    pub steps: Option<usize>,
    /// `Sampler` as written (`DPM++ 2M Karras`, `Euler a`, `DDIM`).
    pub sampler: Option<String>,
    /// `CFG scale`.
    pub cfg_scale: Option<f64>,
    /// `Seed`.
    pub seed: Option<u64>,
    /// `Size` as (width, height) in pixels.
    pub size_px: Option<(usize, usize)>,
    /// `Model` (a name, not a path).
    pub model: Option<String>,
    /// Every `key: value` entry of the settings line in order, values unquoted.
    pub entries: Vec<(String, String)>,
}

impl PngParameters {
    /// The value of `key` in the settings line, if any.
    pub fn entry(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }
}

/// Parses an infotext. A text without a settings line is all prompt. A known setting with a value
/// that is not what it should be (`Steps: many`) is an error naming the key and the value.
pub fn parse_parameters(text: &str) -> AnalysisResult<PngParameters> {
    let trimmed = text.trim();
    let mut lines: Vec<&str> = trimmed.lines().collect();
    let mut parameters = PngParameters::default();
    if let Some(last) = lines.last() {
        if let Some(entries) = settings_line(last).filter(|entries| entries.len() >= 3) {
            parameters.entries = entries;
            lines.pop();
        }
    }
    let mut prompt_lines: Vec<&str> = Vec::new();
    let mut negative_lines: Vec<&str> = Vec::new();
    let mut in_negative = false;
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative_lines.push(rest.trim_start());
        } else if in_negative {
            negative_lines.push(line);
        } else {
            prompt_lines.push(line);
        }
    }
    parameters.prompt = prompt_lines.join("\n").trim().to_string();
    parameters.negative_prompt = negative_lines.join("\n").trim().to_string();

    let entries = parameters.entries.clone();
    for (key, value) in &entries {
        let bad = |expected: &str| AnalysisError::InvalidArgument {
            name: "PNG parameters",
            reason: format!("{key} {value:?} is not {expected}"),
        };
        match key.as_str() {
            "Steps" => {
                parameters.steps = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|&steps| steps > 0)
                        .ok_or_else(|| bad("a whole number of steps >= 1"))?,
                );
            }
            "Sampler" => parameters.sampler = Some(value.clone()),
            "CFG scale" => {
                parameters.cfg_scale = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|scale| scale.is_finite())
                        .ok_or_else(|| bad("a finite number"))?,
                );
            }
            "Seed" => {
                parameters.seed = Some(value.parse().map_err(|_| bad("a whole number >= 0"))?);
            }
            "Size" => {
                let size = value
                    .split_once('x')
                    .and_then(|(width, height)| Some((width.parse().ok()?, height.parse().ok()?)))
                    .filter(|&(width, height): &(usize, usize)| width > 0 && height > 0);
                parameters.size_px = Some(size.ok_or_else(|| bad("WIDTHxHEIGHT in pixels"))?);
            }
            "Model" => parameters.model = Some(value.clone()),
            _ => {}
        }
    }
    Ok(parameters)
}

/// The `key: value, key: value` entries of `line` (A1111's settings line), `None` when the line is
/// not one. Keys start with a word character and hold word characters, spaces, `-` and `/`; a value
/// is a JSON string or runs to the next `,`.
fn settings_line(line: &str) -> Option<Vec<(String, String)>> {
    let mut entries = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim();
        let key_ok = key
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || " -/".contains(c));
        if !key_ok {
            return None;
        }
        let after = rest[colon + 1..].trim_start();
        let (value, remaining) = if after.starts_with('"') {
            let end = quoted_end(after)?;
            let value: String = serde_json::from_str(&after[..end]).ok()?;
            (value, after[end..].trim_start())
        } else {
            match after.find(',') {
                Some(comma) => (after[..comma].trim().to_string(), &after[comma..]),
                None => (after.trim().to_string(), ""),
            }
        };
        entries.push((key.to_string(), value));
        rest = match remaining.strip_prefix(',') {
            Some(next) => next.trim_start(),
            None if remaining.is_empty() => remaining,
            None => return None,
        };
    }
    Some(entries)
}

/// Byte index just past the closing quote of the JSON string at the start of `text`.
fn quoted_end(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (index, character) in text.char_indices().skip(1) {
        match character {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(index + 1),
            _ => {}
        }
    }
    None
}

/// Reads the `parameters` text chunk (tEXt, zTXt or iTXt) of the PNG at `path` and parses it;
/// `Ok(None)` when the PNG has none. A file that cannot be read or is not a PNG is an error naming
/// the file.
pub fn read_png_parameters(path: &Path) -> AnalysisResult<Option<PngParameters>> {
    let bad = |reason: String| AnalysisError::InvalidArgument {
        name: "PNG file",
        reason: format!("{}: {reason}", path.display()),
    };
    let file = File::open(path).map_err(|error| bad(error.to_string()))?;
    let mut reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .map_err(|error| bad(format!("not a readable PNG ({error})")))?;
    // Text chunks may follow the image data: read through to the end.
    let mut pixels = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader
        .next_frame(&mut pixels)
        .map_err(|error| bad(format!("not a readable PNG ({error})")))?;
    reader
        .finish()
        .map_err(|error| bad(format!("not a readable PNG ({error})")))?;
    let info = reader.info();
    let mut text = info
        .uncompressed_latin1_text
        .iter()
        .find(|chunk| chunk.keyword == PARAMETERS_KEYWORD)
        .map(|chunk| chunk.text.clone());
    if text.is_none() {
        if let Some(chunk) = info
            .compressed_latin1_text
            .iter()
            .find(|chunk| chunk.keyword == PARAMETERS_KEYWORD)
        {
            text = Some(
                chunk
                    .get_text()
                    .map_err(|error| bad(format!("unreadable zTXt parameters ({error})")))?,
            );
        }
    }
    if text.is_none() {
        if let Some(chunk) = info
            .utf8_text
            .iter()
            .find(|chunk| chunk.keyword == PARAMETERS_KEYWORD)
        {
            text = Some(
                chunk
                    .get_text()
                    .map_err(|error| bad(format!("unreadable iTXt parameters ({error})")))?,
            );
        }
    }
    text.map(|text| parse_parameters(&text)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::export::{a1111_parameters, write_png_rgb, GenerationParameters};

    #[test]
    fn a1111_infotext_with_a_multi_line_prompt_and_negative_prompt() {
        let text = "masterpiece, best quality, (a cat:1.2) sitting on a windowsill,\n\
                    golden hour, [blurry]\n\
                    Negative prompt: lowres, bad anatomy, (worst quality:1.4),\n\
                    watermark\n\
                    Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3456789012, \
                    Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
                    Denoising strength: 0.7, Clip skip: 2, Hires upscale: 2, \
                    Lora hashes: \"add_detail: 7c6bad76eb54, more: 0123\", Version: v1.10.1";
        let parameters = parse_parameters(text).unwrap();
        assert_eq!(
            parameters.prompt,
            "masterpiece, best quality, (a cat:1.2) sitting on a windowsill,\ngolden hour, [blurry]"
        );
        assert_eq!(
            parameters.negative_prompt,
            "lowres, bad anatomy, (worst quality:1.4),\nwatermark"
        );
        assert_eq!(parameters.steps, Some(28));
        assert_eq!(parameters.sampler.as_deref(), Some("DPM++ 2M Karras"));
        assert_eq!(parameters.cfg_scale, Some(6.5));
        assert_eq!(parameters.seed, Some(3_456_789_012));
        assert_eq!(parameters.size_px, Some((512, 768)));
        assert_eq!(parameters.model.as_deref(), Some("v1-5-pruned-emaonly"));
        assert_eq!(parameters.entry("Clip skip"), Some("2"));
        assert_eq!(
            parameters.entry("Lora hashes"),
            Some("add_detail: 7c6bad76eb54, more: 0123")
        );
        assert_eq!(parameters.entry("Version"), Some("v1.10.1"));
        assert_eq!(parameters.entries.len(), 12);
    }

    #[test]
    fn short_infotexts_and_prompts_alone() {
        let parameters = parse_parameters(
            "a red circle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64",
        )
        .unwrap();
        assert_eq!(parameters.prompt, "a red circle");
        assert_eq!(parameters.negative_prompt, "");
        assert_eq!(parameters.sampler.as_deref(), Some("Euler a"));
        assert_eq!(parameters.model, None);
        // No settings line: everything is prompt.
        let parameters =
            parse_parameters("just a prompt: with a colon\nand a second line").unwrap();
        assert_eq!(
            parameters.prompt,
            "just a prompt: with a colon\nand a second line"
        );
        assert!(parameters.entries.is_empty());
        assert_eq!(parameters.steps, None);
        // A negative prompt on its own line, empty prompt.
        let parameters =
            parse_parameters("Negative prompt: ugly\nSteps: 5, Seed: 9, Size: 8x16").unwrap();
        assert_eq!(parameters.prompt, "");
        assert_eq!(parameters.negative_prompt, "ugly");
        assert_eq!(parameters.size_px, Some((8, 16)));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, expected) in [
            ("p\nSteps: many, Seed: 1, Size: 8x8", "Steps \"many\""),
            ("p\nSteps: 0, Seed: 1, Size: 8x8", "Steps \"0\""),
            ("p\nSteps: 2, Seed: -1, Size: 8x8", "Seed \"-1\""),
            ("p\nSteps: 2, Seed: 1, Size: 8 by 8", "Size \"8 by 8\""),
            (
                "p\nSteps: 2, CFG scale: inf, Size: 8x8",
                "CFG scale \"inf\"",
            ),
        ] {
            let message = parse_parameters(text).unwrap_err().to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn attend_pngs_read_back_what_was_written() {
        let folder = tempfile::tempdir().unwrap();
        let written = GenerationParameters {
            prompt: "a (red:1.3) circle, [square:star:0.5]".into(),
            negative_prompt: "blurry\nnoisy".into(),
            steps: 12,
            sampler: "Euler ancestral".into(),
            cfg_scale: 5.5,
            seed: 42,
            width: 600,
            height: 400,
            model: "attend-shapes".into(),
            extra: vec![("Edit".into(), "a, b: c".into())],
        };
        let path = folder.path().join("image.png");
        write_png_rgb(&path, 1, 1, &[1, 2, 3], Some(&a1111_parameters(&written))).unwrap();
        let read = read_png_parameters(&path).unwrap().unwrap();
        assert_eq!(read.prompt, written.prompt);
        assert_eq!(read.negative_prompt, written.negative_prompt);
        assert_eq!(read.steps, Some(12));
        assert_eq!(read.sampler.as_deref(), Some("Euler ancestral"));
        assert_eq!(read.cfg_scale, Some(5.5));
        assert_eq!(read.seed, Some(42));
        assert_eq!(read.size_px, Some((600, 400)));
        assert_eq!(read.model.as_deref(), Some("attend-shapes"));
        assert_eq!(read.entry("Edit"), Some("a, b: c"));

        // A PNG without parameters, a file that is not a PNG, a missing file.
        write_png_rgb(&path, 1, 1, &[1, 2, 3], None).unwrap();
        assert_eq!(read_png_parameters(&path).unwrap(), None);
        let not_png = folder.path().join("text.png");
        std::fs::write(&not_png, "hello").unwrap();
        let message = read_png_parameters(&not_png).unwrap_err().to_string();
        assert!(
            message.contains("text.png") && message.contains("not a readable PNG"),
            "{message}"
        );
        let message = read_png_parameters(&folder.path().join("none.png"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("none.png"), "{message}");
    }
}
