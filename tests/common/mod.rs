//! Helpers shared by the integration tests: fixture paths, reference tensors, JSON config files,
//! differences. (Each test binary uses a subset, hence `dead_code`.)

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// `tests/fixtures/<path>`.
pub fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// Values a difference can be taken of: a tensor (any float dtype, compared as f32) or f32 values.
pub trait Values {
    /// The shape, which must match the other side's (`[len]` for plain values).
    fn shape(&self) -> Vec<usize>;
    /// Every element as f32, in row-major order.
    fn values(&self) -> Vec<f32>;
}

impl Values for Tensor {
    fn shape(&self) -> Vec<usize> {
        self.dims().to_vec()
    }

    fn values(&self) -> Vec<f32> {
        self.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

impl Values for [f32] {
    fn shape(&self) -> Vec<usize> {
        vec![self.len()]
    }

    fn values(&self) -> Vec<f32> {
        self.to_vec()
    }
}

impl Values for Vec<f32> {
    fn shape(&self) -> Vec<usize> {
        self.as_slice().shape()
    }

    fn values(&self) -> Vec<f32> {
        self.clone()
    }
}

/// Largest absolute element difference of two tensors (or f32 value lists) of the same shape; NaN
/// if either side holds a NaN, so a bound `diff < tolerance` fails on it.
pub fn max_abs_diff<A: Values + ?Sized, B: Values + ?Sized>(a: &A, b: &B) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shape mismatch");
    a.values()
        .iter()
        .zip(b.values())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |worst: f32, diff| {
            if worst.is_nan() || diff.is_nan() {
                f32::NAN
            } else {
                worst.max(diff)
            }
        })
}

/// Reads a JSON file (a model folder's `model_index.json`, a component's `config.json`, ...).
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()))
}

/// Rewrites a JSON file in place: reads it, lets `edit` change the value, writes it back.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value = read_json(path);
    edit(&mut value);
    std::fs::write(path, value.to_string()).unwrap();
}

/// The reference tensors diffusers wrote for a fixture model (`<model>/reference_outputs.safetensors`).
pub fn references(model: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixture(&format!("{model}/reference_outputs.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

/// Small random weights (xorshift, uniform in [-0.02, 0.02)) for every `(name, shape)` of a
/// checkpoint manifest's component: values do not matter for timing, only shapes.
pub fn random_tensors<'a>(
    parameters: impl IntoIterator<Item = (&'a String, &'a Vec<usize>)>,
    seed: u64,
) -> HashMap<String, Tensor> {
    let mut state = seed | 1;
    parameters
        .into_iter()
        .map(|(name, shape)| {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                })
                .collect();
            let tensor = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
            (name.clone(), tensor)
        })
        .collect()
}

/// Copies the fixture model folder `name` (e.g. `tiny-sd1`) into a fresh temporary folder, without
/// its large reference outputs, for tests that damage a copy. Keep the `TempDir` alive.
pub fn copy_of_fixture_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let file_name = entry.file_name();
            if file_name == "reference_outputs.safetensors" {
                continue;
            }
            let target = to.join(&file_name);
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join(name);
    copy_dir(&fixture(name), &dir);
    (temp, dir)
}

/// The bytes of a PNG whose header says `width` x `height` 8-bit RGB pixels, with an empty pixel
/// stream: a decoder meets the (missing) pixels only after reading the size, so the file tests a
/// size limit without holding the pixels.
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    chunk(b"IHDR", &header);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    bytes
}

/// CRC-32 (IEEE), PNG's chunk checksum.
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

/// One run of `request` with every step's attention stored (the prompt's tokens), the store's
/// last step finished.
pub fn generate_with_store(
    model: &attend::pipeline::model::StableDiffusion,
    request: &attend::pipeline::sampling::GenerateRequest,
) -> (
    attend::pipeline::sampling::GenerateOutput,
    attend::attention::store::AttentionStore,
) {
    use attend::attention::store::{AttentionStore, StoreConfig};
    let token_count = model
        .tokenizer
        .encode_prompt(&request.prompt)
        .unwrap()
        .token_count();
    let mut store = AttentionStore::new(StoreConfig::new(token_count));
    let output = attend::pipeline::sampling::generate(
        model,
        request,
        Some(&mut store),
        &mut |_| Ok(()),
        &attend::hook::CancelToken::new(),
    )
    .unwrap();
    store.finish_step().unwrap();
    (output, store)
}
