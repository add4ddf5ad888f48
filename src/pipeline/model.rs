//! A Stable-Diffusion-family model loaded into memory, from a diffusers model folder or a
//! single-file checkpoint (see [`crate::pipeline::checkpoint`]).
//!
//! A folder in diffusers layout:
//!
//! ```text
//! model_index.json
//! tokenizer/      vocab.json + merges.txt (+ tokenizer.json), tokenizer_config.json
//! text_encoder/   config.json + model.safetensors
//! unet/           config.json + diffusion_pytorch_model.safetensors
//! vae/            config.json + diffusion_pytorch_model.safetensors   (absent in pixel space)
//! scheduler/      scheduler_config.json
//! ```
//!
//! A model whose `model_index.json` has `"vae": [null, null]` (or no `vae` entry) runs in pixel
//! space: its "latents" are the image itself in `[-1, 1]`, with no VAE and no scaling.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::analysis::edit_spec::EditDefaults;
use crate::kernels::{with_product_precision, ProductPrecision};
use crate::pipeline::checkpoint::{self, Component, SingleFileCheckpoint};
use crate::pipeline::clip::{ClipTextConfig, ClipTextEncoder};
use crate::pipeline::scheduler::{PredictionType, SchedulerConfig};
use crate::pipeline::tokenizer::PromptTokenizer;
use crate::pipeline::unet::{Unet, UnetConfig};
use crate::pipeline::vae::{AutoencoderKl, VaeConfig};
use crate::pipeline::weights::{RandomWeights, WeightFiles, WeightVariant};
use crate::pipeline::{PipelineError, PipelineResult};

/// How to load a model folder.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compute dtype of the text encoder, UNet and VAE: f32 (default), f16 (half the memory; on the
    /// tiny fixtures the image moves by ~6e-3), or bf16 (GPU devices only).
    pub dtype: DType,
    /// Which weight files to prefer when the folder has full and fp16 ones.
    pub variant: WeightVariant,
    /// Where the weights live and the model runs (CPU default).
    pub device: Device,
    /// Overrides what the UNet predicts (the folder's scheduler config, or the single-file
    /// heuristic: v-prediction for SD 2.x 768 shapes, epsilon otherwise).
    pub prediction_type: Option<PredictionType>,
    /// How the UNet's matrix products treat their operands (f32 default). Its convolutions also
    /// store the filters that precision multiplies with best; it can still be changed later
    /// ([`Unet::set_product_precision`]).
    pub products: ProductPrecision,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            variant: WeightVariant::Full,
            device: Device::Cpu,
            prediction_type: None,
            products: ProductPrecision::F32,
        }
    }
}

/// One stage of a model load, reported before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadProgress {
    /// What is loaded now (`"tokenizer"`, `"text encoder"`, `"UNet"`, `"VAE"`).
    pub stage: &'static str,
    /// Its 0-based index among the load's stages.
    pub index: usize,
    /// How many stages the load has.
    pub count: usize,
}

/// Called before each stage of a load; an error (such as [`PipelineError::Cancelled`]) stops the load
/// and is returned from it.
pub type LoadObserver<'a> = &'a mut dyn FnMut(LoadProgress) -> PipelineResult<()>;

/// The parts of `model_index.json` attend reads.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelIndex {
    /// Pipeline class (`StableDiffusionPipeline`).
    pub class_name: Option<String>,
    /// True when the folder has a VAE (the `vae` entry is present and not `[null, null]`).
    pub has_vae: bool,
    /// The model's own recommendation for Prompt-to-Prompt edits (`_attend_edit_defaults`).
    pub edit_defaults: EditDefaults,
}

impl EditDefaults {
    const KEY: &'static str = "_attend_edit_defaults";

    /// Parses the `_attend_edit_defaults` value of `path`'s JSON (`None`: the key is absent).
    fn from_json(value: Option<&serde_json::Value>, path: &Path) -> PipelineResult<Self> {
        let bad = |reason: String| PipelineError::BadFile {
            path: path.to_path_buf(),
            reason: format!("{}: {reason}", Self::KEY),
        };
        let Some(value) = value else {
            return Ok(Self::default());
        };
        let Some(object) = value.as_object() else {
            return Err(bad(format!("expected an object, found {value}")));
        };
        let mut defaults = Self::default();
        for (key, entry) in object {
            match key.as_str() {
                "self_replace" => {
                    let end = entry
                        .as_f64()
                        .filter(|end| (0.0..=1.0).contains(end))
                        .ok_or_else(|| {
                            bad(format!(
                                "self_replace must be a number in 0..=1, found {entry}"
                            ))
                        })?;
                    defaults.self_replace_end = Some(end);
                }
                "self_replace_max_side" => {
                    let side = entry
                        .as_u64()
                        .and_then(|side| usize::try_from(side).ok())
                        .filter(|side| (1..=4096).contains(side))
                        .ok_or_else(|| {
                            bad(format!(
                                "self_replace_max_side must be a whole number in 1..=4096, found {entry}"
                            ))
                        })?;
                    defaults.self_replace_max_side = Some(side);
                }
                other => return Err(bad(format!("unknown setting \"{other}\""))),
            }
        }
        Ok(defaults)
    }
}

impl ModelIndex {
    /// Reads `model_index.json`; a missing file is [`PipelineError::Missing`], broken JSON
    /// [`PipelineError::BadFile`].
    pub fn from_file(path: &Path) -> PipelineResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                PipelineError::Missing {
                    what: "model_index.json",
                    path: path.to_path_buf(),
                }
            } else {
                PipelineError::BadFile {
                    path: path.to_path_buf(),
                    reason: err.to_string(),
                }
            }
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|err| PipelineError::BadFile {
                path: path.to_path_buf(),
                reason: format!("invalid JSON: {err}"),
            })?;
        let Some(object) = value.as_object() else {
            return Err(PipelineError::BadFile {
                path: path.to_path_buf(),
                reason: "expected a JSON object".to_string(),
            });
        };
        let has_vae = match object.get("vae") {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Array(entry)) => entry.iter().any(|part| !part.is_null()),
            Some(_) => true,
        };
        Ok(Self {
            class_name: object
                .get("_class_name")
                .and_then(|name| name.as_str())
                .map(str::to_string),
            has_vae,
            edit_defaults: EditDefaults::from_json(object.get(EditDefaults::KEY), path)?,
        })
    }
}

/// A loaded model: tokenizer, text encoder, UNet, optional VAE and scheduler settings.
pub struct StableDiffusion {
    name: String,
    dir: PathBuf,
    /// Prompt -> token ids.
    pub tokenizer: PromptTokenizer,
    /// The text encoder's config.
    pub text_encoder_config: ClipTextConfig,
    /// Token ids `[batch, 77]` -> text embeddings `[batch, 77, hidden]`.
    pub text_encoder: ClipTextEncoder,
    /// The denoiser (its config via `unet.config()`).
    pub unet: Unet,
    /// The VAE's config (`None` in pixel space).
    pub vae_config: Option<VaeConfig>,
    /// Latents <-> images (`None` in pixel space).
    pub vae: Option<AutoencoderKl>,
    /// `scheduler/scheduler_config.json`; replace it to run with other scheduler settings.
    pub scheduler_config: SchedulerConfig,
    dtype: DType,
    device: Device,
    warnings: Vec<String>,
    edit_defaults: EditDefaults,
}

impl StableDiffusion {
    /// Loads a model folder or a single-file checkpoint (see the module docs). Every error names
    /// the file or folder at fault.
    pub fn load(path: &Path, options: &LoadOptions) -> PipelineResult<Self> {
        Self::load_observed(path, options, &mut |_| Ok(()))
    }

    /// [`StableDiffusion::load`], calling `observe` before each component; an error from it stops
    /// the load (nothing half-loaded is kept: the model only exists once every part loaded).
    pub fn load_observed(
        path: &Path,
        options: &LoadOptions,
        observe: LoadObserver<'_>,
    ) -> PipelineResult<Self> {
        if path.is_file() || checkpoint::is_pickle_path(path) {
            let checkpoint = SingleFileCheckpoint::open(path, options.prediction_type)?;
            Self::load_checkpoint(&checkpoint, options, observe)
        } else {
            Self::load_folder(path, options, observe)
        }
    }

    fn check_options(options: &LoadOptions) -> PipelineResult<()> {
        if options.device.is_cpu() && options.dtype == DType::BF16 {
            return Err(PipelineError::InvalidArgument {
                name: "dtype",
                reason: "bf16 cannot run on the CPU (candle has no bf16 matrix product there); use f32 or f16".to_string(),
            });
        }
        if !matches!(options.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(PipelineError::InvalidArgument {
                name: "dtype",
                reason: format!(
                    "{:?} is not a compute dtype; use f32, f16 or bf16",
                    options.dtype
                ),
            });
        }
        Ok(())
    }

    /// Loads an opened single-file checkpoint with its inferred configs (which a caller may have
    /// corrected), reading the weights under their diffusers names.
    pub fn load_checkpoint(
        checkpoint: &SingleFileCheckpoint,
        options: &LoadOptions,
        observe: LoadObserver<'_>,
    ) -> PipelineResult<Self> {
        Self::check_options(options)?;
        let path = checkpoint.path();
        let configs = &checkpoint.configs;
        let stage = |index: usize, stage: &'static str| LoadProgress {
            stage,
            index,
            count: 4,
        };
        observe(stage(0, "tokenizer"))?;
        let tokenizer = PromptTokenizer::bundled_clip(&configs.pad_token)?;
        let weights = checkpoint.map()?;
        let blame = |error: candle_core::Error| PipelineError::BadWeights {
            path: path.to_path_buf(),
            reason: error.to_string(),
        };
        let var_builder =
            |component| weights.var_builder(checkpoint, component, options.dtype, &options.device);
        observe(stage(1, "text encoder"))?;
        let text_encoder =
            ClipTextEncoder::new(var_builder(Component::TextEncoder), &configs.text_encoder)
                .map_err(|error| match error {
                    PipelineError::Tensor(error) => blame(error),
                    other => other,
                })?;
        observe(stage(2, "UNet"))?;
        let unet = unet_for(options, || {
            Unet::new(var_builder(Component::Unet), &configs.unet)
        })
        .map_err(|error| match error {
            PipelineError::Tensor(error) => blame(error),
            other => other,
        })?;
        observe(stage(3, "VAE"))?;
        let vae =
            AutoencoderKl::new(var_builder(Component::Vae), &configs.vae).map_err(|error| {
                match error {
                    PipelineError::Tensor(error) => blame(error),
                    other => other,
                }
            })?;
        let mut scheduler_config = configs.scheduler.clone();
        if let Some(prediction) = options.prediction_type {
            scheduler_config.prediction_type = prediction;
        }
        let name = path.file_stem().map_or_else(
            || path.display().to_string(),
            |stem| stem.to_string_lossy().into_owned(),
        );
        let model = Self {
            name,
            dir: path.to_path_buf(),
            tokenizer,
            text_encoder_config: configs.text_encoder.clone(),
            text_encoder,
            unet,
            vae_config: Some(configs.vae.clone()),
            vae: Some(vae),
            scheduler_config,
            dtype: options.dtype,
            device: options.device.clone(),
            warnings: vec![format!(
                "{} single file: configs inferred from the tensor shapes ({} prediction)",
                configs.family.label(),
                checkpoint::prediction_type_name(
                    options
                        .prediction_type
                        .unwrap_or(configs.scheduler.prediction_type)
                )
            )],
            edit_defaults: EditDefaults::default(),
        };
        model.check_components_fit(path)?;
        Ok(model)
    }

    /// A model with the shapes of a manifest (`{"configs": {"text_encoder", "unet", "vae"}}`, as
    /// `tests/fixtures/manifests/sd15.json`) and made-up weights ([`RandomWeights`] from `seed`),
    /// Stable Diffusion's scheduler and the bundled CLIP tokenizer. Its images are noise: it exists
    /// to time full-size models where no checkpoint is on disk.
    pub fn with_random_weights(
        manifest: &Path,
        options: &LoadOptions,
        seed: u64,
    ) -> PipelineResult<Self> {
        Self::check_options(options)?;
        let bad_file = |reason: String| PipelineError::BadFile {
            path: manifest.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(manifest).map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                PipelineError::Missing {
                    what: "model manifest",
                    path: manifest.to_path_buf(),
                }
            } else {
                bad_file(error.to_string())
            }
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| bad_file(error.to_string()))?;
        let config = |name: &str| {
            json.pointer(&format!("/configs/{name}"))
                .cloned()
                .ok_or_else(|| bad_file(format!("no `configs.{name}` object")))
        };
        let text_encoder_config =
            ClipTextConfig::from_json_value(config("text_encoder")?, manifest)?;
        let unet_config = UnetConfig::from_json(&config("unet")?.to_string(), manifest)?;
        let vae_config = VaeConfig::from_json(&config("vae")?.to_string(), manifest)?;
        let family = if text_encoder_config.hidden_size == 1024 {
            checkpoint::ModelFamily::Sd2
        } else {
            checkpoint::ModelFamily::Sd1
        };
        let prediction = options.prediction_type.unwrap_or(PredictionType::Epsilon);
        let scheduler_config = checkpoint::sd_scheduler_config(prediction, manifest)?;
        let var_builder = || RandomWeights::new(seed).var_builder(options.dtype, &options.device);
        let model = Self {
            name: format!(
                "{} (random weights)",
                manifest.file_stem().map_or_else(
                    || model_name(manifest),
                    |stem| stem.to_string_lossy().into_owned()
                )
            ),
            dir: manifest.to_path_buf(),
            tokenizer: PromptTokenizer::bundled_clip(family.pad_token())?,
            text_encoder: ClipTextEncoder::new(var_builder(), &text_encoder_config)?,
            text_encoder_config,
            unet: unet_for(options, || Unet::new(var_builder(), &unet_config))?,
            vae: Some(AutoencoderKl::new(var_builder(), &vae_config)?),
            vae_config: Some(vae_config),
            scheduler_config,
            dtype: options.dtype,
            device: options.device.clone(),
            warnings: vec![format!(
                "{}: random weights with the manifest's shapes (for timing only; images are noise)",
                manifest.display()
            )],
            edit_defaults: EditDefaults::default(),
        };
        model.check_components_fit(manifest)?;
        Ok(model)
    }

    fn load_folder(
        dir: &Path,
        options: &LoadOptions,
        observe: LoadObserver<'_>,
    ) -> PipelineResult<Self> {
        if !dir.is_dir() {
            return Err(PipelineError::Missing {
                what: "model folder or checkpoint file",
                path: dir.to_path_buf(),
            });
        }
        Self::check_options(options)?;
        let index = ModelIndex::from_file(&dir.join("model_index.json"))?;
        let mut warnings = Vec::new();
        let stage_count = if index.has_vae { 4 } else { 3 };
        let stage = |index: usize, stage: &'static str| LoadProgress {
            stage,
            index,
            count: stage_count,
        };

        observe(stage(0, "tokenizer"))?;
        let tokenizer = PromptTokenizer::from_folder(&dir.join("tokenizer"))?;
        observe(stage(1, "text encoder"))?;

        let text_encoder_dir = dir.join("text_encoder");
        let text_encoder_config = ClipTextConfig::from_file(&text_encoder_dir.join("config.json"))?;
        let text_encoder_weights = open_weights(
            &text_encoder_dir,
            "text encoder weights (model.safetensors)",
            options,
            &mut warnings,
        )?;
        let text_encoder = ClipTextEncoder::new(
            text_encoder_weights.var_builder(options.dtype, &options.device)?,
            &text_encoder_config,
        )
        .map_err(|err| text_encoder_weights.weight_error(err))?;

        observe(stage(2, "UNet"))?;
        let unet_dir = dir.join("unet");
        let unet_config_path = unet_dir.join("config.json");
        let unet_config = UnetConfig::from_file(&unet_config_path)?;
        let unet_weights = open_weights(
            &unet_dir,
            "UNet weights (diffusion_pytorch_model.safetensors)",
            options,
            &mut warnings,
        )?;
        let unet = unet_for(options, || {
            Unet::new(
                unet_weights.var_builder(options.dtype, &options.device)?,
                &unet_config,
            )
        })
        .map_err(|err| unet_weights.weight_error(err))?;

        let (vae_config, vae) = if index.has_vae {
            observe(stage(3, "VAE"))?;
            let vae_dir = dir.join("vae");
            let vae_config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
            let vae_weights = open_weights(
                &vae_dir,
                "VAE weights (diffusion_pytorch_model.safetensors)",
                options,
                &mut warnings,
            )?;
            let vae = AutoencoderKl::new(
                vae_weights.var_builder(options.dtype, &options.device)?,
                &vae_config,
            )
            .map_err(|err| vae_weights.weight_error(err))?;
            (Some(vae_config), Some(vae))
        } else {
            (None, None)
        };

        let mut scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        if let Some(prediction) = options.prediction_type {
            scheduler_config.prediction_type = prediction;
        }

        let model = Self {
            name: model_name(dir),
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder_config,
            text_encoder,
            unet,
            vae_config,
            vae,
            scheduler_config,
            dtype: options.dtype,
            device: options.device.clone(),
            warnings,
            edit_defaults: index.edit_defaults,
        };
        model.check_components_fit(&unet_config_path)?;
        Ok(model)
    }

    /// The UNet must take what the VAE (or pixel space) produces and attend to what the text
    /// encoder produces.
    fn check_components_fit(&self, unet_config_path: &Path) -> PipelineResult<()> {
        let unet_config = self.unet.config();
        let expected_channels = self.latent_channels_of_space();
        if unet_config.in_channels != expected_channels {
            let source = if self.vae.is_some() {
                "the VAE's latent_channels"
            } else {
                "a pixel-space model's 3 colour channels"
            };
            return Err(PipelineError::BadConfig {
                path: unet_config_path.to_path_buf(),
                reason: format!(
                    "in_channels is {} but {source} is {expected_channels}",
                    unet_config.in_channels
                ),
            });
        }
        let text_width = self.text_encoder_config.hidden_size;
        if unet_config.text_embedding_dim() != text_width {
            return Err(PipelineError::BadConfig {
                path: unet_config_path.to_path_buf(),
                reason: format!(
                    "cross_attention_dim is {} but the text encoder's hidden_size is {text_width}",
                    unet_config.text_embedding_dim()
                ),
            });
        }
        Ok(())
    }

    fn latent_channels_of_space(&self) -> usize {
        self.vae_config
            .as_ref()
            .map_or(3, |config| config.latent_channels)
    }

    /// The model's name (its folder name, or the checkpoint file's name without extension).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The folder (or single checkpoint file) it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Prompt-to-Prompt settings the folder recommends (`_attend_edit_defaults`; empty for
    /// checkpoints without it).
    pub fn edit_defaults(&self) -> EditDefaults {
        self.edit_defaults
    }

    /// True when the model denoises images directly (no VAE).
    pub fn is_pixel_space(&self) -> bool {
        self.vae.is_none()
    }

    /// Image pixels per latent pixel along each side (8 for SD, 1 in pixel space).
    pub fn latent_downscale_factor(&self) -> usize {
        self.vae.as_ref().map_or(1, AutoencoderKl::downscale_factor)
    }

    /// Channels of the latents (`[1, channels, h, w]`): 4 for SD, 3 in pixel space.
    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    /// The VAE's `scaling_factor` (latents are divided by it before decoding); 1 in pixel space.
    pub fn latent_scaling_factor(&self) -> f64 {
        self.vae_config
            .as_ref()
            .map_or(1.0, |config| config.scaling_factor)
    }

    /// How many times the UNet halves the latent size (one per down block but the last).
    pub fn unet_downsampling_count(&self) -> usize {
        self.unet
            .config()
            .down_blocks()
            .iter()
            .filter(|block| block.downsample)
            .count()
    }

    /// Image widths and heights must be multiples of this: the VAE factor (8 for SD, 2 for the tiny
    /// fixtures, 1 in pixel space), as in diffusers. Latent sides the UNet's down-samplings do not
    /// halve evenly are fine: each up-sampling takes its skip connection's size, as diffusers does.
    pub fn size_multiple_px(&self) -> usize {
        self.latent_downscale_factor()
    }

    /// The size the model was trained at, `(width_px, height_px)`: the UNet's `sample_size` times the
    /// VAE factor (`sample_size` 64 when the config has none).
    pub fn default_size_px(&self) -> (usize, usize) {
        let factor = self.latent_downscale_factor();
        let (height, width) = match &self.unet.config().sample_size {
            Some(serde_json::Value::Number(side)) => {
                let side = side.as_u64().and_then(|side| usize::try_from(side).ok());
                (side.unwrap_or(64), side.unwrap_or(64))
            }
            Some(serde_json::Value::Array(sides)) => {
                let side = |index: usize| {
                    sides
                        .get(index)
                        .and_then(serde_json::Value::as_u64)
                        .and_then(|side| usize::try_from(side).ok())
                        .unwrap_or(64)
                };
                (side(0), side(1))
            }
            _ => (64, 64),
        };
        (width * factor, height * factor)
    }

    /// Compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Things the user should know about how the model was loaded (e.g. fp16 weights used).
    pub fn load_warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Finds and checks a component's weights, noting when only the other precision was available.
/// Builds the UNet with `options.products` as the thread's product precision (its convolutions
/// store the Winograd filters that precision multiplies with) and makes it the UNet's.
fn unet_for<E>(options: &LoadOptions, build: impl FnOnce() -> Result<Unet, E>) -> Result<Unet, E> {
    let mut unet = with_product_precision(options.products, build)?;
    unet.set_product_precision(options.products);
    Ok(unet)
}

fn open_weights(
    component_dir: &Path,
    what: &'static str,
    options: &LoadOptions,
    warnings: &mut Vec<String>,
) -> PipelineResult<WeightFiles> {
    let weights = WeightFiles::open(component_dir, what, options.variant)?;
    let uses_fp16_files = weights
        .paths()
        .iter()
        .any(|path| path.to_string_lossy().contains(".fp16"));
    if uses_fp16_files && options.variant == WeightVariant::Full {
        warnings.push(format!(
            "{what}: only fp16 files found in {}; using them",
            component_dir.display()
        ));
    }
    Ok(weights)
}

/// The folder's name, or its path when it has none.
fn model_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_with(extra: serde_json::Value) -> (tempfile::TempDir, PathBuf) {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("model_index.json");
        let mut index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "vae": ["diffusers", "AutoencoderKL"],
        });
        if let (Some(index), Some(extra)) = (index.as_object_mut(), extra.as_object()) {
            index.extend(extra.clone());
        }
        std::fs::write(&path, index.to_string()).unwrap();
        (temp, path)
    }

    #[test]
    fn edit_defaults_are_empty_without_the_key_and_read_when_present() {
        let (_temp, path) = index_with(serde_json::json!({}));
        let index = ModelIndex::from_file(&path).unwrap();
        assert_eq!(index.edit_defaults, EditDefaults::default());
        assert!(index.has_vae);

        let (_temp, path) = index_with(serde_json::json!({
            "_attend_edit_defaults": {"self_replace": 0.2, "self_replace_max_side": 32}
        }));
        let index = ModelIndex::from_file(&path).unwrap();
        assert_eq!(
            index.edit_defaults,
            EditDefaults {
                self_replace_end: Some(0.2),
                self_replace_max_side: Some(32),
            }
        );

        let (_temp, path) = index_with(serde_json::json!({
            "_attend_edit_defaults": {"self_replace_max_side": 8}
        }));
        let defaults = ModelIndex::from_file(&path).unwrap().edit_defaults;
        assert_eq!(defaults.self_replace_end, None);
        assert_eq!(defaults.self_replace_max_side, Some(8));
    }

    #[test]
    fn bad_edit_defaults_name_the_file_and_the_setting() {
        for (value, expected) in [
            (serde_json::json!(3), "expected an object"),
            (
                serde_json::json!({"self_replace": 1.5}),
                "self_replace must be",
            ),
            (
                serde_json::json!({"self_replace": "0.2"}),
                "self_replace must be",
            ),
            (
                serde_json::json!({"self_replace_max_side": 0}),
                "self_replace_max_side must be",
            ),
            (
                serde_json::json!({"self_replace_max_side": 16.5}),
                "self_replace_max_side must be",
            ),
            (
                serde_json::json!({"cross_replace": 0.8}),
                "unknown setting \"cross_replace\"",
            ),
        ] {
            let (_temp, path) = index_with(serde_json::json!({ "_attend_edit_defaults": value }));
            let err = ModelIndex::from_file(&path).unwrap_err();
            assert!(matches!(err, PipelineError::BadFile { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains("model_index.json"), "{message}");
            assert!(message.contains("_attend_edit_defaults"), "{message}");
            assert!(message.contains(expected), "{message}");
        }
    }

    /// A manifest of tiny-sd1's configs, in a temp folder.
    use candle_core::Tensor;

    fn tiny_manifest(configs: serde_json::Value) -> (tempfile::TempDir, PathBuf) {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("tiny.json");
        std::fs::write(&path, serde_json::json!({ "configs": configs }).to_string()).unwrap();
        (temp, path)
    }

    fn tiny_sd1_config(component: &str) -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sd1")
            .join(component)
            .join("config.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn random_weights_build_a_model_of_the_manifest_shapes() {
        let (_temp, path) = tiny_manifest(serde_json::json!({
            "text_encoder": tiny_sd1_config("text_encoder"),
            "unet": tiny_sd1_config("unet"),
            "vae": tiny_sd1_config("vae"),
        }));
        let model =
            StableDiffusion::with_random_weights(&path, &LoadOptions::default(), 0).unwrap();
        assert_eq!(model.name(), "tiny (random weights)");
        assert_eq!(
            model.unet.config().block_out_channels,
            tiny_sd1_config("unet")["block_out_channels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|width| width.as_u64().unwrap() as usize)
                .collect::<Vec<_>>()
        );
        assert!(model.vae.is_some());
        assert_eq!(model.load_warnings().len(), 1);
        // Same seed, same weights: the text encoder gives the same embedding.
        let again =
            StableDiffusion::with_random_weights(&path, &LoadOptions::default(), 0).unwrap();
        let ids = Tensor::new(&[[49406u32, 320, 49407]], &Device::Cpu).unwrap();
        let first = model.text_encoder.forward(&ids).unwrap();
        let second = again.text_encoder.forward(&ids).unwrap();
        let difference: f32 = (first - second)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(difference, 0.0);
    }

    #[test]
    fn a_bad_manifest_names_the_file_and_the_missing_part() {
        let (_temp, path) = tiny_manifest(serde_json::json!({
            "text_encoder": tiny_sd1_config("text_encoder"),
            "vae": tiny_sd1_config("vae"),
        }));
        let message = StableDiffusion::with_random_weights(&path, &LoadOptions::default(), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("tiny.json"), "{message}");
        assert!(message.contains("configs.unet"), "{message}");
        let missing = path.with_file_name("absent.json");
        let message = StableDiffusion::with_random_weights(&missing, &LoadOptions::default(), 0)
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains("absent.json"), "{message}");
    }
}
