//! Real images in: invert an image into the noise (and per-step corrections) that regenerate it, so
//! that heat maps, segments and Prompt-to-Prompt edits work on the user's own image.
//!
//! Every method starts from the image's latent `z*_0` (the VAE posterior mean x scaling factor, or
//! the pixels in `[-1, 1]` for a pixel-space model) and walks DDIM's timesteps upwards to `z*_T`,
//! keeping every latent of the trajectory. What a later run needs to come back down to the image
//! is the method's [`ReplayCorrection`]. See ALGORITHMS notes in the README for the references.

mod null_text;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Tensor;

use crate::analysis::image::RgbImage;
use crate::hook::CancelToken;
use crate::pipeline::model::StableDiffusion;
use crate::pipeline::{PipelineError, PipelineResult};

/// How an image is inverted. Each is a documented choice; see the README for measurements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum InversionMethod {
    /// DDIM inversion at guidance 1 (the noise evaluated at the destination timestep); editing
    /// replays from `z*_T` with no correction.
    Ddim,
    /// Null-text inversion (Mokady et al.): per step, the unconditional embedding optimised with Adam
    /// so that guided sampling follows the DDIM trajectory.
    NullText,
    /// Negative-prompt inversion (Miyake et al. 2023): the source prompt's embedding as the
    /// unconditional one at every step.
    NegativePrompt,
    /// Direct inversion (Ju et al., ICLR 2024): per-step latent offsets that keep the source branch
    /// exactly on the inverted trajectory; gradient-free.
    Direct,
    /// Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024): noise maps that
    /// reproduce the image exactly under an eta = 1 sampler.
    Ddpm,
}

impl InversionMethod {
    /// Every method, in the order the UI lists them.
    pub const ALL: [Self; 5] = [
        Self::Ddim,
        Self::NullText,
        Self::NegativePrompt,
        Self::Direct,
        Self::Ddpm,
    ];

    /// The CLI name (`ddim`, `null-text`, `negative-prompt`, `direct`, `ddpm`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::NullText => "null-text",
            Self::NegativePrompt => "negative-prompt",
            Self::Direct => "direct",
            Self::Ddpm => "ddpm",
        }
    }

    /// Every CLI name, comma-separated (for error messages).
    pub fn accepted_names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl std::fmt::Display for InversionMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for InversionMethod {
    type Err = PipelineError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|method| method.name() == text.trim())
            .ok_or_else(|| PipelineError::InvalidArgument {
                name: "inversion method",
                reason: format!(
                    "unknown method `{text}`; accepted: {}",
                    Self::accepted_names()
                ),
            })
    }
}

/// What to invert an image with.
#[derive(Clone, Debug, PartialEq)]
pub struct InversionRequest {
    /// A description of the image (the source prompt of later edits); must not be empty.
    pub prompt: String,
    /// The method.
    pub method: InversionMethod,
    /// DDIM steps of the trajectory (later runs that replay it use the same count).
    pub steps: usize,
    /// The guidance scale later runs replay with (null-text optimises for it; `ddim` inverts at 1
    /// whatever this says, and replays with it).
    pub guidance: f64,
    /// Seed of the independent noise draws of `ddpm`.
    pub seed: u64,
}

/// What regenerating the image needs beyond the start latents, per method.
#[derive(Clone, Debug)]
pub enum ReplayCorrection {
    /// `ddim`: nothing.
    None,
    /// `negative-prompt`: the source prompt is the negative prompt of the source branch.
    SourcePromptAsNegative,
    /// `null-text`: the optimised unconditional embedding of each step, `[steps, tokens, dim]`.
    UnconditionalEmbeddings(Tensor),
    /// `direct`: added to the source branch's latents after each step, `[steps, 1, c, h, w]`.
    LatentOffsets(Tensor),
    /// `ddpm`: the noise map of each step for an eta = 1 DDIM step, `[steps, 1, c, h, w]`.
    NoiseMaps(Tensor),
}

/// An inverted image: everything an edit needs to replay it (saved as `inversion.safetensors`).
#[derive(Clone, Debug)]
pub struct Inversion {
    /// The method, prompt, steps and guidance it was made with.
    pub request: InversionRequest,
    /// The model's name ([`StableDiffusion::name`]); replaying on another model is refused.
    pub model_name: String,
    /// Image size in pixels (the fitted image).
    pub size_px: (usize, usize),
    /// [`crate::analysis::image::image_hash`] of the fitted image.
    pub image_hash: String,
    /// The DDIM timesteps of the replay, in sampling order (high to low), one per step.
    pub timesteps: Vec<f64>,
    /// `z*_0` (the image's latent) to `z*_T`: `[steps + 1, 1, c, h, w]` f32.
    pub trajectory: Tensor,
    /// What the replay adds to the plain DDIM step.
    pub correction: ReplayCorrection,
    /// Wall-clock seconds the inversion took.
    pub seconds: f64,
}

impl Inversion {
    /// The latents a replay starts from, `z*_T`: `[1, c, h, w]`.
    pub fn start_latents(&self) -> PipelineResult<Tensor> {
        let steps = self.timesteps.len();
        Ok(self.trajectory.get(steps)?)
    }

    /// Writes the inversion as safetensors (tensors plus a JSON header of the settings),
    /// atomically.
    pub fn save(&self, path: &Path) -> PipelineResult<()> {
        let _ = path;
        Err(PipelineError::InvalidArgument {
            name: "inversion file",
            reason: "saving inversions is not built yet".to_string(),
        })
    }

    /// Reads an inversion written by [`Inversion::save`] and checks it against `model`: another
    /// model, size or a broken file is a clear error naming the file.
    pub fn load(path: &Path, model: &StableDiffusion) -> PipelineResult<Self> {
        let _ = (path, model);
        Err(PipelineError::InvalidArgument {
            name: "inversion file",
            reason: "loading inversions is not built yet".to_string(),
        })
    }
}

/// Reported after every inversion step.
#[derive(Clone, Debug)]
pub struct InversionProgress {
    /// What is running (`"inverting"`, `"optimising null text"`, ...).
    pub phase: &'static str,
    /// Steps done in this phase.
    pub steps_done: usize,
    /// Steps of this phase.
    pub step_count: usize,
}

/// The image's latent `z*_0`, `[1, c, h, w]` f32: the VAE posterior mean x the scaling factor, or the
/// pixels mapped to `[-1, 1]` for a pixel-space model. The image must already have the run's size.
pub fn encode_image(model: &StableDiffusion, image: &RgbImage) -> PipelineResult<Tensor> {
    let _ = (model, image);
    Err(PipelineError::InvalidArgument {
        name: "image",
        reason: "encoding images is not built yet".to_string(),
    })
}

/// Inverts `image` (already fitted to a size the model accepts) with `request`, reporting progress
/// through `on_step` (an error from it stops the inversion) and checking `cancel` before every
/// UNet call.
pub fn invert(
    model: &StableDiffusion,
    image: &RgbImage,
    request: &InversionRequest,
    on_step: &mut dyn FnMut(&InversionProgress) -> PipelineResult<()>,
    cancel: &CancelToken,
) -> PipelineResult<Arc<Inversion>> {
    let _ = (model, image, request, on_step, cancel);
    Err(PipelineError::InvalidArgument {
        name: "inversion",
        reason: "inversion is not built yet".to_string(),
    })
}
