//! Style sets (Style Aligned, [`crate::attention::style_sampling`]) as the worker runs them: what
//! the UI asks for ([`StyleSetParams`], plain data) and what a finished set returns
//! ([`StyleSetOutput`]).
//!
//! A set is one run ([`crate::worker::Command::GenerateStyleSet`]) of `1 + N` images: image 0 is
//! the reference, image `i` the `i`-th target prompt. Each image is reported as its own
//! [`crate::worker::Branch::StyleImage`]: `Started` for every image (in image order) before the
//! first step, then per step one `Step` per image (in image order) with its preview and its
//! attention maps (the conditional row of that image), and at the end one `Finished` per image,
//! the last image's ending the run. The engine keeps every image's attention; the probe, the
//! Segments view and the attention export read the selected image's
//! ([`crate::worker::Command::SelectStyleImage`], image 0 after a set).

use crate::attention::style_sampling::MAX_TARGETS;
use crate::worker::error::EngineError;
use crate::worker::plain::RgbImage;
use crate::worker::protocol::GenerateParams;

pub use crate::attention::style_aligned::StyleAlignedConfig;

/// What a style set needs. Together with the model this fixes every image exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct StyleSetParams {
    /// The reference image's parameters: its prompt, negative prompt (shared by every image),
    /// seed (target `i` draws its noise with `seed + i`), steps, guidance, scheduler and size
    /// (shared). A real image to replay ([`GenerateParams::source_image`]) is not accepted.
    pub reference: GenerateParams,
    /// The target prompts, in image order (at least one).
    pub target_prompts: Vec<String>,
    /// How the targets share the reference's attention; `None` generates every image
    /// independently (the baseline).
    pub sharing: Option<StyleAlignedConfig>,
    /// A real image as the reference, `[height, width, 3]` fitted to the run's size and described
    /// by the reference prompt: the engine inverts it (DDIM) and the reference follows its
    /// inverted trajectory (reported as `InversionProgress` before the set starts); the run then
    /// takes the DDIM scheduler. `None`: the reference is generated from its prompt.
    pub reference_image: Option<RgbImage>,
}

impl StyleSetParams {
    /// Images in the set (reference + targets).
    pub fn image_count(&self) -> usize {
        1 + self.target_prompts.len()
    }

    /// The parameters of image `index` (0: the reference): its prompt and seed.
    pub fn image_params(&self, index: usize) -> GenerateParams {
        let prompt = match index.checked_sub(1) {
            None => self.reference.prompt.clone(),
            Some(target) => self.target_prompts.get(target).cloned().unwrap_or_default(),
        };
        GenerateParams {
            prompt,
            seed: self.reference.seed.wrapping_add(index as u64),
            source_image: None,
            ..self.reference.clone()
        }
    }
}

/// The result of a finished set.
#[derive(Clone, Debug)]
pub struct StyleSetOutput {
    /// Every image, reference first, `[height, width, 3]` each.
    pub images: Vec<RgbImage>,
    /// Per image, the resolutions `(h, w)` at which self-attention was kept (the layers that
    /// share attention with the reference show none).
    pub self_attention_grids: Vec<Vec<(usize, usize)>>,
}

/// Checks what a set needs before any work: at least one target prompt and none empty, at most
/// [`MAX_TARGETS`], no real image to replay, sharing settings in range.
pub fn check_style_set_params(params: &StyleSetParams) -> Result<(), EngineError> {
    let invalid =
        |name: &'static str, reason: String| EngineError::InvalidArgument { name, reason };
    if params.target_prompts.is_empty() {
        return Err(invalid(
            "target prompts",
            "none given: a style set needs at least one target prompt besides the reference"
                .to_owned(),
        ));
    }
    if let Some(position) = params
        .target_prompts
        .iter()
        .position(|prompt| prompt.trim().is_empty())
    {
        return Err(invalid(
            "target prompts",
            format!("target prompt {} is empty", position + 1),
        ));
    }
    if params.target_prompts.len() > MAX_TARGETS {
        return Err(invalid(
            "target prompts",
            format!(
                "{} given; at most {MAX_TARGETS} per set",
                params.target_prompts.len()
            ),
        ));
    }
    if params.reference.source_image.is_some() {
        return Err(invalid(
            "reference",
            "a style set starts from noise; a real image cannot be replayed as its reference"
                .to_owned(),
        ));
    }
    if params.reference.steps == 0 || params.reference.steps > 1000 {
        return Err(invalid(
            "steps",
            format!("{} is not in 1..=1000", params.reference.steps),
        ));
    }
    if let Some(image) = &params.reference_image {
        if image.width == 0 || image.height == 0 || !image.is_consistent() {
            return Err(invalid(
                "reference image",
                format!(
                    "{}x{} with {} bytes is not an RGB image",
                    image.width,
                    image.height,
                    image.pixels.len()
                ),
            ));
        }
        if params.reference.prompt.trim().is_empty() {
            return Err(invalid(
                "reference prompt",
                "it is empty: describe the reference image (it is inverted with that prompt)"
                    .to_owned(),
            ));
        }
    }
    if let Some(config) = &params.sharing {
        config
            .validate()
            .map_err(|error| invalid("style sharing settings", error.to_string()))?;
    }
    Ok(())
}

/// Makes image `index` of a held set the engine's latest run: the latest run's maps go back into
/// the slot of the image selected so far (`selected`), image `index`'s maps come out of theirs.
/// Shared by the real and the fake engine, which hold different maps (`T`).
pub(crate) fn swap_in_set_image<T>(
    images: &mut [Option<T>],
    selected: &mut usize,
    latest_run: &mut Option<T>,
    index: usize,
) -> Result<(), EngineError> {
    if index >= images.len() {
        return Err(EngineError::InvalidArgument {
            name: "style set image",
            reason: format!(
                "{index} is not an image of the set (it has {})",
                images.len()
            ),
        });
    }
    if index == *selected {
        return Ok(());
    }
    let Some(chosen) = images[index].take() else {
        return Err(EngineError::Unavailable(format!(
            "the maps of image {index} are missing"
        )));
    };
    images[*selected] = latest_run.replace(chosen);
    *selected = index;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(targets: &[&str]) -> StyleSetParams {
        StyleSetParams {
            reference: GenerateParams {
                prompt: "a red circle on grass".to_owned(),
                seed: 5,
                ..GenerateParams::default()
            },
            target_prompts: targets.iter().map(|prompt| (*prompt).to_owned()).collect(),
            sharing: Some(StyleAlignedConfig::default()),
            reference_image: None,
        }
    }

    #[test]
    fn images_take_their_prompt_and_seed() {
        let set = params(&["a square", "a triangle"]);
        assert_eq!(set.image_count(), 3);
        assert_eq!(set.image_params(0).prompt, "a red circle on grass");
        assert_eq!(set.image_params(0).seed, 5);
        assert_eq!(set.image_params(2).prompt, "a triangle");
        assert_eq!(set.image_params(2).seed, 7);
    }

    #[test]
    fn bad_sets_are_refused_with_the_reason() {
        assert!(check_style_set_params(&params(&["a square"])).is_ok());
        let none = check_style_set_params(&params(&[])).unwrap_err();
        assert!(none.to_string().contains("at least one target"), "{none}");
        let empty = check_style_set_params(&params(&["a square", "  "])).unwrap_err();
        assert!(
            empty.to_string().contains("target prompt 2 is empty"),
            "{empty}"
        );
        let mut bad_level = params(&["a square"]);
        bad_level.sharing = Some(StyleAlignedConfig {
            only_self_level: 2.0,
            ..StyleAlignedConfig::default()
        });
        assert!(check_style_set_params(&bad_level).is_err());
        let mut broken_image = params(&["a square"]);
        broken_image.reference_image = Some(RgbImage {
            width: 4,
            height: 4,
            pixels: vec![0; 5],
        });
        let error = check_style_set_params(&broken_image).unwrap_err();
        assert!(error.to_string().contains("reference image"), "{error}");
    }
}
