//! Saving and loading an [`Inversion`] as safetensors with its settings in the `__metadata__`.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{Inversion, InversionMethod, InversionRequest, ReplayCorrection, INVERSION_FORMAT};
use crate::analysis::export::write_atomically;
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::scheduler::ddim::DdimScheduler;
use crate::pipeline::scheduler::Scheduler;
use crate::pipeline::{PipelineError, PipelineResult};

/// The name of the correction's tensor in the file, if the method has one.
fn correction_tensor_name(method: InversionMethod) -> Option<&'static str> {
    match method {
        InversionMethod::Ddim | InversionMethod::NegativePrompt | InversionMethod::Direct => None,
        InversionMethod::NullText => Some("unconditional_embeddings"),
        InversionMethod::Ddpm => Some("noise_maps"),
    }
}

/// Writes `inversion` to `path` atomically (see [`Inversion::save`]).
pub(super) fn save(inversion: &Inversion, path: &Path) -> PipelineResult<()> {
    let bad = |reason: String| PipelineError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut tensors: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![(
        "trajectory",
        inversion.trajectory.dims().to_vec(),
        f32_bytes(&inversion.trajectory)?,
    )];
    match &inversion.correction {
        ReplayCorrection::None
        | ReplayCorrection::SourcePromptAsNegative
        | ReplayCorrection::SourceFollowsTrajectory => {}
        ReplayCorrection::UnconditionalEmbeddings(tensor) | ReplayCorrection::NoiseMaps(tensor) => {
            let name = correction_tensor_name(inversion.request.method).ok_or_else(|| {
                bad(format!(
                    "a {} inversion carries a correction tensor it cannot have",
                    inversion.request.method
                ))
            })?;
            tensors.push((name, tensor.dims().to_vec(), f32_bytes(tensor)?));
        }
    }
    let request = &inversion.request;
    let json = |value: serde_json::Result<String>| value.map_err(|error| bad(error.to_string()));
    let metadata = HashMap::from([
        ("format".to_string(), INVERSION_FORMAT.to_string()),
        ("method".to_string(), request.method.name().to_string()),
        ("prompt".to_string(), request.prompt.clone()),
        ("steps".to_string(), request.steps.to_string()),
        (
            "guidance".to_string(),
            json(serde_json::to_string(&request.guidance))?,
        ),
        ("seed".to_string(), request.seed.to_string()),
        ("model".to_string(), inversion.model_name.clone()),
        ("width".to_string(), inversion.size_px.0.to_string()),
        ("height".to_string(), inversion.size_px.1.to_string()),
        ("image_hash".to_string(), inversion.image_hash.clone()),
        (
            "timesteps".to_string(),
            json(serde_json::to_string(&inversion.timesteps))?,
        ),
        (
            "seconds".to_string(),
            json(serde_json::to_string(&inversion.seconds))?,
        ),
    ]);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in &tensors {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map_err(|error| bad(format!("tensor {name}: {error}")))?;
        views.push((*name, view));
    }
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|error| bad(format!("cannot encode the inversion: {error}")))?;
    write_atomically(path, |writer| writer.write_all(&bytes)).map_err(|error| {
        PipelineError::BadFile {
            path: path.to_path_buf(),
            reason: format!("cannot write the inversion: {error}"),
        }
    })
}

/// Little-endian f32 bytes of `tensor`.
fn f32_bytes(tensor: &Tensor) -> PipelineResult<Vec<u8>> {
    Ok(tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect())
}

/// Reads an inversion from `path` and checks it against `model` (see [`Inversion::load`]).
pub(super) fn load(path: &Path, model: &StableDiffusion) -> PipelineResult<Inversion> {
    let bad = |reason: String| PipelineError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            PipelineError::Missing {
                what: "inversion file",
                path: path.to_path_buf(),
            }
        } else {
            bad(error.to_string())
        }
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|error| bad(format!("not a safetensors inversion file: {error}")))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|error| bad(format!("not a safetensors inversion file: {error}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        metadata.get(key).ok_or_else(|| {
            bad(format!(
                "its metadata has no `{key}`; it is not an inversion saved by attend"
            ))
        })
    };
    let format = field("format")?;
    if format != INVERSION_FORMAT {
        return Err(bad(format!(
            "its format is `{format}`, attend reads `{INVERSION_FORMAT}`"
        )));
    }
    let parsed = |key: &str| -> PipelineResult<serde_json::Value> {
        serde_json::from_str(field(key)?)
            .map_err(|error| bad(format!("its `{key}` is not valid: {error}")))
    };
    let whole = |key: &str| -> PipelineResult<usize> {
        field(key)?.parse().map_err(|_| {
            bad(format!(
                "its `{key}` is not a whole number: {}",
                metadata[key]
            ))
        })
    };
    let method: InversionMethod = field("method")?
        .parse()
        .map_err(|error: PipelineError| bad(error.to_string()))?;
    let steps = whole("steps")?;
    let width = whole("width")?;
    let height = whole("height")?;
    let guidance = parsed("guidance")?
        .as_f64()
        .ok_or_else(|| bad("its `guidance` is not a number".to_string()))?;
    let seconds = parsed("seconds")?.as_f64().unwrap_or(0.0);
    let seed = field("seed")?.parse::<u64>().map_err(|_| {
        bad(format!(
            "its `seed` is not a whole number: {}",
            metadata["seed"]
        ))
    })?;
    let timesteps: Vec<f64> = serde_json::from_value(parsed("timesteps")?).map_err(|error| {
        bad(format!(
            "its `timesteps` are not a list of numbers: {error}"
        ))
    })?;
    let model_name = field("model")?.clone();
    if model_name != model.name() {
        return Err(bad(format!(
            "it was made with the model `{model_name}`, the loaded model is `{}`; invert the \
             image again with this model",
            model.name()
        )));
    }
    let factor = model.latent_downscale_factor();
    let multiple = model.size_multiple_px();
    if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
        return Err(bad(format!(
            "its size {width}x{height} px is not one the model `{}` accepts (multiples of {multiple})",
            model.name()
        )));
    }
    if timesteps.len() != steps {
        return Err(bad(format!(
            "it lists {} timesteps for {steps} steps",
            timesteps.len()
        )));
    }
    let expected_timesteps = DdimScheduler::new(&model.scheduler_config, steps)?
        .timesteps()
        .to_vec();
    if expected_timesteps != timesteps {
        return Err(bad(format!(
            "it was made on the DDIM timesteps {timesteps:?}, the model's scheduler gives \
             {expected_timesteps:?}; invert the image again"
        )));
    }
    let latent_shape = [1, model.latent_channels(), height / factor, width / factor];
    let read = |name: &str, expected: &[usize]| -> PipelineResult<Tensor> {
        let view = tensors
            .tensor(name)
            .map_err(|_| bad(format!("the tensor `{name}` is missing")))?;
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "the tensor `{name}` is {:?}, expected F32",
                view.dtype()
            )));
        }
        if view.shape() != expected {
            return Err(bad(format!(
                "the tensor `{name}` has shape {:?}, expected {expected:?} for {steps} steps at \
                 {width}x{height} px on `{}`",
                view.shape(),
                model.name()
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect();
        if values.iter().any(|value| !value.is_finite()) {
            return Err(bad(format!(
                "the tensor `{name}` holds NaN or infinite values"
            )));
        }
        Ok(Tensor::from_vec(values, expected, model.device())?)
    };
    let per_step_latents = [steps, 1, latent_shape[1], latent_shape[2], latent_shape[3]];
    let trajectory_shape = [
        steps + 1,
        1,
        latent_shape[1],
        latent_shape[2],
        latent_shape[3],
    ];
    let trajectory = read("trajectory", &trajectory_shape)?;
    let correction = match method {
        InversionMethod::Ddim => ReplayCorrection::None,
        InversionMethod::NegativePrompt => ReplayCorrection::SourcePromptAsNegative,
        InversionMethod::NullText => {
            let view = tensors
                .tensor("unconditional_embeddings")
                .map_err(|_| bad("the tensor `unconditional_embeddings` is missing".to_string()))?;
            let shape = view.shape().to_vec();
            if shape.len() != 3 || shape[0] != steps {
                return Err(bad(format!(
                    "the tensor `unconditional_embeddings` has shape {shape:?}, expected \
                     [{steps}, tokens, dim]"
                )));
            }
            ReplayCorrection::UnconditionalEmbeddings(read("unconditional_embeddings", &shape)?)
        }
        // Files that also carry `latent_offsets` (the gap to the trajectory per step) replay the
        // same: the source row lands on the trajectory either way.
        InversionMethod::Direct => ReplayCorrection::SourceFollowsTrajectory,
        InversionMethod::Ddpm => {
            ReplayCorrection::NoiseMaps(read("noise_maps", &per_step_latents)?)
        }
    };
    Ok(Inversion {
        request: InversionRequest {
            prompt: field("prompt")?.clone(),
            method,
            steps,
            guidance,
            seed,
        },
        model_name,
        size_px: (width, height),
        image_hash: field("image_hash")?.clone(),
        timesteps,
        trajectory,
        correction,
        seconds,
    })
}
