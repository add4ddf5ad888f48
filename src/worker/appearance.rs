//! Appearance transfer over the worker channel: the plain request of
//! [`crate::worker::Command::AppearanceTransfer`], the updates it streams
//! ([`crate::worker::Event::Appearance`]) and its result, with the correspondence the editor's probe
//! reads (where in the appearance image each output pixel attends).
//!
//! Per transfer request (one run id): `Appearance { Inputs }` once both images are ready (generated,
//! fitted), `Appearance { Progress }`es while the engine prepares (inverts both images), then
//! `Appearance { Step }`s in step order with a preview of the output, and `Appearance { Finished }`;
//! or `Cancelled` / `Failed` in place of any of them.

use std::sync::Arc;

use crate::analysis::image::{fit_image, ImageFit, RgbImage};
use crate::worker::error::EngineError;
use crate::worker::protocol::StepTiming;

pub use crate::analysis::appearance::{AppearanceMasks, Correspondence, LabelledMask};
pub use crate::attention::appearance_sampling::AppearanceSettings;

/// One of the two images of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AppearanceSlot {
    /// The image whose shapes and places the output keeps.
    Structure,
    /// The image whose colours and textures the output takes.
    Appearance,
}

impl AppearanceSlot {
    /// Both slots, structure first.
    pub const BOTH: [Self; 2] = [Self::Structure, Self::Appearance];

    /// The slot's name in the editor ("structure", "appearance").
    pub fn name(self) -> &'static str {
        match self {
            Self::Structure => "structure",
            Self::Appearance => "appearance",
        }
    }
}

/// Where one image of a transfer comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum AppearanceInput {
    /// An image of any size: the worker fits it to the transfer's size.
    Image(RgbImage),
    /// Generated first by the engine from the slot's prompt (with the request's seed for the
    /// structure and the next seed for the appearance).
    Generate,
}

/// What [`crate::worker::Command::AppearanceTransfer`] asks for (plain data; the engine checks the
/// values with [`check_appearance_params`]).
#[derive(Clone, Debug, PartialEq)]
pub struct AppearanceTransferParams {
    /// The structure image.
    pub structure: AppearanceInput,
    /// What the structure image shows (it is inverted with this prompt, and its nouns label its
    /// masks); not empty.
    pub structure_prompt: String,
    /// The appearance image.
    pub appearance: AppearanceInput,
    /// What the appearance image shows; not empty.
    pub appearance_prompt: String,
    /// Steps, skip, contrast, swap guidance, AdaIN.
    pub settings: AppearanceSettings,
    /// Seed of the inversions' noise (and of generated inputs).
    pub seed: u64,
    /// How an image of another size is fitted to the model's size.
    pub fit: ImageFit,
}

/// A finished transfer: what [`crate::worker::Event::Appearance`] with
/// [`AppearanceUpdate::Finished`] carries.
#[derive(Clone, Debug, PartialEq)]
pub struct AppearanceResult {
    /// The output: the structure's shapes in the appearance's colours, `[height, width, 3]`.
    pub output: RgbImage,
    /// The structure image regenerated from its inversion.
    pub structure_reconstruction: RgbImage,
    /// The appearance image regenerated from its inversion.
    pub appearance_reconstruction: RgbImage,
    /// Both images' masks, matched by label (the masked AdaIN's regions).
    pub masks: AppearanceMasks,
    /// Where the output's pixels attend in the appearance image (shared, not copied, by the
    /// editor's views).
    pub correspondence: Arc<Correspondence>,
    /// Seconds the transfer took (preparing both images included).
    pub seconds: f64,
    /// Things the user should know (prompt truncated, ...).
    pub warnings: Vec<String>,
}

/// What a transfer reports while it runs ([`crate::worker::Event::Appearance`]).
#[derive(Clone, Debug, PartialEq)]
pub enum AppearanceUpdate {
    /// Both inputs are ready: fitted to the transfer's size (and generated, for a slot that asked
    /// for it), `[height, width, 3]` each.
    Inputs {
        /// The structure image as the engine uses it.
        structure: RgbImage,
        /// The appearance image as the engine uses it.
        appearance: RgbImage,
    },
    /// Preparing: what runs (`"generating the structure image"`, `"inverting"`, ...).
    Progress {
        /// What runs now.
        phase: String,
        /// Seconds since the request started.
        elapsed_secs: f64,
    },
    /// One denoising step of the output is done.
    Step {
        /// 0-based step index among the output's steps.
        step_index: usize,
        /// The output's number of steps (after the skip).
        step_count: usize,
        /// A cheap preview of the output so far, `[height, width, 3]` (latent resolution for
        /// latent models).
        preview: RgbImage,
        /// Timings.
        timing: StepTiming,
    },
    /// The transfer finished.
    Finished(Box<AppearanceResult>),
}

/// Checks a transfer request before any work: both prompts given, images of consistent size,
/// settings in range ([`AppearanceSettings::validate`]). Errors name the value and what is wrong.
pub fn check_appearance_params(params: &AppearanceTransferParams) -> Result<(), EngineError> {
    let invalid =
        |name: &'static str, reason: String| EngineError::InvalidArgument { name, reason };
    for (name, prompt, input) in [
        (
            "structure prompt",
            &params.structure_prompt,
            &params.structure,
        ),
        (
            "appearance prompt",
            &params.appearance_prompt,
            &params.appearance,
        ),
    ] {
        if prompt.trim().is_empty() {
            return Err(invalid(
                name,
                "it is empty: describe what the image shows (its nouns label its masks)".to_owned(),
            ));
        }
        if let AppearanceInput::Image(image) = input {
            if image.width == 0 || image.height == 0 || !image.is_consistent() {
                return Err(invalid(
                    if name.starts_with("structure") {
                        "structure image"
                    } else {
                        "appearance image"
                    },
                    format!(
                        "{}x{} with {} bytes is not an RGB image",
                        image.width,
                        image.height,
                        image.pixels.len()
                    ),
                ));
            }
        }
    }
    params.settings.validate()?;
    Ok(())
}

/// `image` fitted to `width` x `height` pixels with `fit` (unchanged when it has that size).
pub(crate) fn fit_input(
    slot: AppearanceSlot,
    image: &RgbImage,
    size_px: (usize, usize),
    fit: ImageFit,
) -> Result<RgbImage, EngineError> {
    fit_image(image, size_px.0, size_px.1, fit)
        .map(|fitted| fitted.image)
        .map_err(|error| EngineError::InvalidArgument {
            name: match slot {
                AppearanceSlot::Structure => "structure image",
                AppearanceSlot::Appearance => "appearance image",
            },
            reason: format!("cannot fit it to {}x{} px: {error}", size_px.0, size_px.1),
        })
}
