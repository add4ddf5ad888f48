//! Weight files: finding a component's safetensors, checking them before use, and `VarBuilder`s that
//! report a missing or wrong-shape tensor by name and file.
//!
//! Also a name/shape-checking backend built from a parameter manifest (names and shapes of a real
//! checkpoint, no values) that lets tests build full-size models without the weights.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::pipeline::{PipelineError, PipelineResult};

/// Which precision of weight files to prefer when a folder ships several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WeightVariant {
    /// Full-precision files (`*.safetensors`); the `.fp16` files only when they are all there is.
    #[default]
    Full,
    /// The `.fp16.safetensors` files when present, else the full-precision ones.
    Fp16,
}

/// Name and shape of one tensor in a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// safetensors dtype name (`F32`, `F16`, `BF16`, ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
}

/// The checked header of one safetensors file.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    /// The file.
    pub path: PathBuf,
    /// Every tensor in the file.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Bytes per element of a safetensors dtype, `None` for dtypes attend does not know.
fn dtype_size_bytes(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Reads and checks the header of a safetensors file without reading the tensor data: the header
/// must be valid JSON, every dtype known, every tensor's byte range consistent with its shape, and
/// the file exactly as long as the header says. Anything else is [`PipelineError::BadFile`] naming
/// the file and what is wrong.
pub fn read_safetensors_header(path: &Path) -> PipelineResult<SafetensorsHeader> {
    let bad = |reason: String| PipelineError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            PipelineError::Missing {
                what: "safetensors file",
                path: path.to_path_buf(),
            }
        } else {
            bad(err.to_string())
        }
    })?;
    let file_len = file.metadata().map_err(|err| bad(err.to_string()))?.len();
    let mut length_bytes = [0u8; 8];
    file.read_exact(&mut length_bytes).map_err(|_| {
        bad(format!(
            "not a safetensors file: {file_len} bytes, too short for the 8-byte header length"
        ))
    })?;
    let header_len = u64::from_le_bytes(length_bytes);
    let data_start = header_len.saturating_add(8);
    if data_start > file_len {
        return Err(bad(format!(
            "truncated or not a safetensors file: the header claims {header_len} bytes but the file has {file_len}"
        )));
    }
    let header_len = usize::try_from(header_len)
        .map_err(|_| bad(format!("header length {header_len} does not fit in memory")))?;
    let mut header_bytes = vec![0u8; header_len];
    file.read_exact(&mut header_bytes)
        .map_err(|err| bad(format!("cannot read the header: {err}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header_bytes)
        .map_err(|err| bad(format!("corrupt header (not a JSON object): {err}")))?;

    let mut tensors = BTreeMap::new();
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let parsed: RawTensorEntry = serde_json::from_value(entry)
            .map_err(|err| bad(format!("corrupt header entry for tensor `{name}`: {err}")))?;
        let Some(element_size) = dtype_size_bytes(&parsed.dtype) else {
            return Err(bad(format!(
                "tensor `{name}` has unknown dtype `{}`",
                parsed.dtype
            )));
        };
        let [start, end] = parsed.data_offsets;
        let expected_bytes = parsed
            .shape
            .iter()
            .try_fold(element_size, |acc, &dim| acc.checked_mul(dim))
            .and_then(|bytes| u64::try_from(bytes).ok());
        if end < start || expected_bytes != Some(end - start) {
            return Err(bad(format!(
                "corrupt header: tensor `{name}` ({} {:?}) has byte range {start}..{end}",
                parsed.dtype, parsed.shape
            )));
        }
        ranges.push((start, end, name.clone()));
        tensors.insert(
            name,
            TensorInfo {
                dtype: parsed.dtype,
                shape: parsed.shape,
            },
        );
    }
    ranges.sort();
    let mut expected_start = 0u64;
    for (start, end, name) in &ranges {
        if *start != expected_start {
            return Err(bad(format!(
                "corrupt header: tensor `{name}` starts at byte {start}, expected {expected_start}"
            )));
        }
        expected_start = *end;
    }
    let data_len = file_len - data_start;
    if expected_start != data_len {
        let verdict = if expected_start > data_len {
            "truncated"
        } else {
            "has trailing bytes"
        };
        return Err(bad(format!(
            "{verdict}: the header describes {expected_start} bytes of tensor data but the file holds {data_len}"
        )));
    }
    Ok(SafetensorsHeader {
        path: path.to_path_buf(),
        tensors,
    })
}

#[derive(serde::Deserialize)]
struct RawTensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The weight file base names diffusers and transformers use.
const WEIGHT_BASE_NAMES: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Finds a component's weight files in `component_dir` (`unet/`, `vae/`, `text_encoder/`):
/// `diffusion_pytorch_model.safetensors` or `model.safetensors`, their `.fp16` variants, or a
/// sharded `*.safetensors.index.json` (`*.safetensors.index.fp16.json`). `what` names the component
/// in the error when nothing is found.
pub fn find_weight_files(
    component_dir: &Path,
    what: &'static str,
    variant: WeightVariant,
) -> PipelineResult<Vec<PathBuf>> {
    if !component_dir.is_dir() {
        return Err(PipelineError::Missing {
            what,
            path: component_dir.to_path_buf(),
        });
    }
    let full = |base: &str| {
        (
            component_dir.join(format!("{base}.safetensors")),
            component_dir.join(format!("{base}.safetensors.index.json")),
        )
    };
    let half = |base: &str| {
        (
            component_dir.join(format!("{base}.fp16.safetensors")),
            component_dir.join(format!("{base}.safetensors.index.fp16.json")),
        )
    };
    let mut candidates = Vec::new();
    for base in WEIGHT_BASE_NAMES {
        match variant {
            WeightVariant::Full => candidates.extend([full(base), half(base)]),
            WeightVariant::Fp16 => candidates.extend([half(base), full(base)]),
        }
    }
    for (single, index) in candidates {
        if single.is_file() {
            return Ok(vec![single]);
        }
        if index.is_file() {
            return shard_files(&index);
        }
    }
    for base in WEIGHT_BASE_NAMES {
        let pickle = component_dir.join(format!("{base}.bin"));
        if pickle.is_file() {
            return Err(PipelineError::BadFile {
                path: pickle,
                reason: "PyTorch pickle weights are not supported; convert them to .safetensors"
                    .to_string(),
            });
        }
    }
    Err(PipelineError::Missing {
        what,
        path: component_dir.to_path_buf(),
    })
}

/// The shard files listed in a `*.safetensors.index.json` (`weight_map` values), in first-seen order.
fn shard_files(index_path: &Path) -> PipelineResult<Vec<PathBuf>> {
    let bad = |reason: String| PipelineError::BadFile {
        path: index_path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index_path).map_err(|err| bad(err.to_string()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|err| bad(format!("invalid JSON: {err}")))?;
    let Some(weight_map) = index.get("weight_map").and_then(|map| map.as_object()) else {
        return Err(bad("no `weight_map` object".to_string()));
    };
    let folder = index_path.parent().unwrap_or(Path::new("."));
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for file_name in weight_map.values() {
        let Some(file_name) = file_name.as_str() else {
            return Err(bad("a `weight_map` value is not a file name".to_string()));
        };
        if seen.insert(file_name.to_string()) {
            files.push(folder.join(file_name));
        }
    }
    if files.is_empty() {
        return Err(bad("`weight_map` lists no files".to_string()));
    }
    Ok(files)
}

/// A component's checked weight files.
#[derive(Clone, Debug)]
pub struct WeightFiles {
    headers: Vec<SafetensorsHeader>,
}

impl WeightFiles {
    /// Finds (see [`find_weight_files`]) and checks (see [`read_safetensors_header`]) a component's
    /// weights.
    pub fn open(
        component_dir: &Path,
        what: &'static str,
        variant: WeightVariant,
    ) -> PipelineResult<Self> {
        Self::from_files(&find_weight_files(component_dir, what, variant)?)
    }

    /// Checks the headers of the given safetensors files (at least one).
    pub fn from_files(files: &[PathBuf]) -> PipelineResult<Self> {
        let headers = files
            .iter()
            .map(|file| read_safetensors_header(file))
            .collect::<PipelineResult<Vec<_>>>()?;
        if headers.is_empty() {
            return Err(PipelineError::InvalidArgument {
                name: "weight files",
                reason: "no safetensors file given".to_string(),
            });
        }
        Ok(Self { headers })
    }

    /// The files, in load order.
    pub fn paths(&self) -> Vec<&Path> {
        self.headers
            .iter()
            .map(|header| header.path.as_path())
            .collect()
    }

    /// The path to name in errors: the file, or for sharded weights the folder holding them.
    pub fn blame_path(&self) -> PathBuf {
        match self.headers.as_slice() {
            [single] => single.path.clone(),
            [first, ..] => first
                .path
                .parent()
                .map_or_else(|| first.path.clone(), Path::to_path_buf),
            [] => PathBuf::new(),
        }
    }

    /// Name, dtype and shape of every tensor across the files.
    pub fn tensors(&self) -> BTreeMap<&str, &TensorInfo> {
        self.headers
            .iter()
            .flat_map(|header| {
                header
                    .tensors
                    .iter()
                    .map(|(name, info)| (name.as_str(), info))
            })
            .collect()
    }

    /// A `VarBuilder` over the (memory-mapped) files that converts every tensor to `dtype` and
    /// reports a missing or wrong-shape tensor with its name and file.
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> PipelineResult<VarBuilder<'static>> {
        let backend = CheckedSafetensors::new(&self.headers)?;
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }

    /// Turns an error raised while building a model from these weights into
    /// [`PipelineError::BadWeights`] naming the file; other errors pass through.
    pub fn weight_error(&self, error: impl Into<PipelineError>) -> PipelineError {
        match error.into() {
            PipelineError::Tensor(tensor_error) => PipelineError::BadWeights {
                path: self.blame_path(),
                reason: tensor_error.to_string(),
            },
            other => other,
        }
    }
}

/// A safetensors backend that checks names and shapes against the headers before loading.
struct CheckedSafetensors {
    tensors: candle_core::safetensors::MmapedSafetensors,
    /// Tensor name -> (file, shape).
    index: HashMap<String, (PathBuf, Vec<usize>)>,
    /// All files, for "missing from" messages.
    file_list: String,
}

impl CheckedSafetensors {
    fn new(headers: &[SafetensorsHeader]) -> PipelineResult<Self> {
        let paths: Vec<&Path> = headers.iter().map(|header| header.path.as_path()).collect();
        let tensors = map_files(&paths)?;
        let index = headers
            .iter()
            .flat_map(|header| {
                header
                    .tensors
                    .iter()
                    .map(|(name, info)| (name.clone(), (header.path.clone(), info.shape.clone())))
            })
            .collect();
        let file_list = paths
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self {
            tensors,
            index,
            file_list,
        })
    }
}

/// Memory-maps already checked safetensors files.
#[allow(unsafe_code)]
pub(crate) fn map_files(
    paths: &[&Path],
) -> PipelineResult<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the files were opened read-only and their headers checked just before; as with every
    // memory-mapped file, they must not be modified while attend runs (mmap's usual contract).
    unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }.map_err(|err| {
        PipelineError::BadFile {
            path: paths
                .first()
                .map(|path| path.to_path_buf())
                .unwrap_or_default(),
            reason: format!("cannot map the weights: {err}"),
        }
    })
}

impl SimpleBackend for CheckedSafetensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some((path, stored_shape)) = self.index.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` is missing from {}",
                self.file_list
            )));
        };
        if stored_shape.as_slice() != shape.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {stored_shape:?} in {} but the model expects {:?}",
                path.display(),
                shape.dims()
            )));
        }
        self.tensors.load(name, device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.index.contains_key(name) {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` is missing from {}",
                self.file_list
            )));
        }
        self.tensors.load(name, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

/// A parameter manifest: a real checkpoint's configs and the name and shape of every parameter, per
/// component (`text_encoder`, `unet`, `vae`).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ParameterManifest {
    /// Component -> its published config (`config.json` content, possibly abridged).
    pub configs: BTreeMap<String, serde_json::Value>,
    /// Component -> parameter name -> shape.
    pub parameters: BTreeMap<String, BTreeMap<String, Vec<usize>>>,
}

impl ParameterManifest {
    /// Reads a manifest JSON file.
    pub fn from_file(path: &Path) -> PipelineResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|err| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason: format!("not a parameter manifest: {err}"),
        })
    }

    /// A checking backend for one component, or `None` if the manifest does not list it.
    pub fn backend(&self, component: &str) -> Option<ManifestBackend> {
        self.parameters
            .get(component)
            .map(|parameters| ManifestBackend::new(parameters.clone(), component))
    }
}

/// A `VarBuilder` backend that serves zeros for the names and shapes of a manifest, rejects unknown
/// names and wrong shapes, and records every name requested. Clones share the record.
///
/// The zeros are one broadcast scalar per parameter, so even an 860M-parameter UNet costs no memory.
#[derive(Clone, Debug)]
pub struct ManifestBackend {
    expected: Arc<BTreeMap<String, Vec<usize>>>,
    requested: Arc<Mutex<BTreeSet<String>>>,
    label: String,
}

impl ManifestBackend {
    /// A backend for `parameters` (name -> shape); `label` names the source in errors.
    pub fn new(parameters: BTreeMap<String, Vec<usize>>, label: &str) -> Self {
        Self {
            expected: Arc::new(parameters),
            requested: Arc::new(Mutex::new(BTreeSet::new())),
            label: label.to_string(),
        }
    }

    /// A `VarBuilder` over a clone of this backend (same record).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every name requested so far.
    pub fn requested_names(&self) -> BTreeSet<String> {
        self.requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Manifest parameters never requested (a model that loads the real checkpoint requests all).
    pub fn unrequested_names(&self) -> Vec<String> {
        let requested = self.requested_names();
        self.expected
            .keys()
            .filter(|name| !requested.contains(*name))
            .cloned()
            .collect()
    }

    /// Number of parameters in the manifest.
    pub fn parameter_count(&self) -> usize {
        self.expected.len()
    }

    fn record(&self, name: &str) {
        self.requested
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
    }

    fn zeros(shape: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }
}

impl SimpleBackend for ManifestBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(expected) = self.expected.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` is not a parameter of the {} checkpoint",
                self.label
            )));
        };
        if expected.as_slice() != shape.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {expected:?} in the {} checkpoint but the model expects {:?}",
                self.label,
                shape.dims()
            )));
        }
        self.record(name);
        Self::zeros(expected, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(expected) = self.expected.get(name) else {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` is not a parameter of the {} checkpoint",
                self.label
            )));
        };
        self.record(name);
        Self::zeros(expected, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.expected.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_text_encoder_weights() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sd1/text_encoder/model.safetensors")
    }

    #[test]
    fn sharded_weights_are_found_through_their_index() {
        let temp = tempfile::tempdir().unwrap();
        let tensors =
            candle_core::safetensors::load(tiny_text_encoder_weights(), &Device::Cpu).unwrap();
        let mut shards: [HashMap<String, Tensor>; 2] = [HashMap::new(), HashMap::new()];
        let mut weight_map = serde_json::Map::new();
        for (index, (name, tensor)) in tensors.into_iter().enumerate() {
            let shard = index % 2;
            weight_map.insert(
                name.clone(),
                serde_json::json!(format!("model-0000{}-of-00002.safetensors", shard + 1)),
            );
            shards[shard].insert(name, tensor);
        }
        for (shard, tensors) in shards.iter().enumerate() {
            let path = temp
                .path()
                .join(format!("model-0000{}-of-00002.safetensors", shard + 1));
            candle_core::safetensors::save(tensors, path).unwrap();
        }
        std::fs::write(
            temp.path().join("model.safetensors.index.json"),
            serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
        )
        .unwrap();

        let weights =
            WeightFiles::open(temp.path(), "text encoder weights", WeightVariant::Full).unwrap();
        assert_eq!(weights.paths().len(), 2);
        assert_eq!(weights.blame_path(), temp.path());
        let vb = weights.var_builder(DType::F32, &Device::Cpu).unwrap();
        for name in weight_map.keys() {
            let info = weights.tensors()[name.as_str()].clone();
            assert_eq!(
                vb.get(info.shape.clone(), name).unwrap().dims(),
                &info.shape[..]
            );
        }
        let err = vb.get(3, "no.such.tensor").unwrap_err().to_string();
        assert!(
            err.contains("no.such.tensor") && err.contains("model-00001"),
            "{err}"
        );
    }

    #[test]
    fn trailing_bytes_and_pickles_are_reported() {
        let temp = tempfile::tempdir().unwrap();
        let mut bytes = std::fs::read(tiny_text_encoder_weights()).unwrap();
        bytes.extend_from_slice(b"junk");
        let path = temp.path().join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let err = read_safetensors_header(&path).unwrap_err().to_string();
        assert!(
            err.contains("trailing bytes") && err.contains("model.safetensors"),
            "{err}"
        );

        let pickle_dir = tempfile::tempdir().unwrap();
        std::fs::write(
            pickle_dir.path().join("diffusion_pytorch_model.bin"),
            b"pickle",
        )
        .unwrap();
        let err =
            find_weight_files(pickle_dir.path(), "UNet weights", WeightVariant::Full).unwrap_err();
        assert!(matches!(err, PipelineError::BadFile { .. }), "{err:?}");
        assert!(err.to_string().contains("convert"), "{err}");
    }

    #[test]
    fn fp16_files_are_preferred_only_when_asked() {
        let unet_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1/unet");
        let full = find_weight_files(&unet_dir, "UNet weights", WeightVariant::Full).unwrap();
        let half = find_weight_files(&unet_dir, "UNet weights", WeightVariant::Fp16).unwrap();
        assert!(full[0].ends_with("diffusion_pytorch_model.safetensors"));
        assert!(half[0].ends_with("diffusion_pytorch_model.fp16.safetensors"));
        let header = read_safetensors_header(&half[0]).unwrap();
        assert_eq!(header.tensors["conv_in.weight"].dtype, "F16");
        assert_eq!(header.tensors["conv_in.weight"].shape, [32, 4, 3, 3]);
    }
}

/// A weight source that makes up every requested tensor: normal noise with standard deviation
/// 0.02 (1 for norm scales), seeded per name. Benchmarks use it to build full-size models (SD 1.5's
/// UNet) without any checkpoint on disk.
#[derive(Clone, Debug)]
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    /// Random weights from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A `VarBuilder` over these weights in `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn tensor(
        &self,
        shape: &[usize],
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = crate::pipeline::rng::NoiseRng::new(self.seed ^ name_hash);
        let is_norm_scale = name.ends_with("weight") && shape.len() == 1;
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| {
                let noise = rng.next_normal_f64() as f32 * 0.02;
                if is_norm_scale {
                    1.0 + noise
                } else {
                    noise
                }
            })
            .collect();
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(shape.dims(), name, dtype, device)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
