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
