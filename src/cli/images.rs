//! Real images in, shared by `invert`, `edit`, `segment` and `generate`: the flags (`--image`,
//! `--inversion-method`, `--inversion`, `--fit`) and the one helper that turns them into an
//! [`Inversion`] to replay, by inverting the image or by loading and checking a saved inversion.
//!
//! The work is split in two so that bad input fails before the model loads: [`ImageArgs::read`]
//! checks the flags, the prompt and decodes the image; [`obtain_inversion`] (with the model)
//! fits the image, then loads and checks the file or inverts, printing progress to stderr.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::image::{
    fit_image, image_difference, image_hash, read_image, FittedImage, ImageFit, RgbImage,
};
use attend::attention::edit_sampling::{invert_recording_source, InvertedSource};
use attend::attention::p2p::RecordConfig;
use attend::hook::CancelToken;
use attend::pipeline::inversion::{
    invert, Inversion, InversionMethod, InversionProgress, InversionRequest,
};
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::GenerateRequest;
use attend::pipeline::scheduler::SchedulerKind;

/// The inversion method used when none is named. `direct` reconstructs exactly and needs no
/// gradients (see the README's measurements for the others).
pub const DEFAULT_INVERSION_METHOD: InversionMethod = InversionMethod::Direct;

/// Clap value parser of `--fit`: `crop`, `pad` or `stretch`.
pub fn parse_fit(text: &str) -> Result<ImageFit, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "crop" => Ok(ImageFit::Crop),
        "pad" => Ok(ImageFit::Pad),
        "stretch" => Ok(ImageFit::Stretch),
        _ => Err("expected crop, pad or stretch".to_string()),
    }
}

/// The `--fit` name of `fit`.
pub fn fit_name(fit: ImageFit) -> &'static str {
    match fit {
        ImageFit::Crop => "crop",
        ImageFit::Pad => "pad",
        ImageFit::Stretch => "stretch",
    }
}

/// Clap value parser of inversion methods (`--method`, `--inversion-method`).
pub fn parse_method(text: &str) -> Result<InversionMethod, String> {
    text.parse::<InversionMethod>().map_err(|_| {
        format!(
            "unknown method; accepted: {}",
            InversionMethod::accepted_names()
        )
    })
}

/// Clap value parser of comma-separated method lists (`ddim,direct`).
pub fn parse_methods(text: &str) -> Result<Vec<InversionMethod>, String> {
    let methods = text
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| parse_method(name).map_err(|error| format!("{name:?}: {error}")))
        .collect::<Result<Vec<_>, _>>()?;
    if methods.is_empty() {
        return Err("names no method".to_string());
    }
    Ok(methods)
}

/// The real-image flags of `edit`, `segment` and `generate`. With `--image` (or `--inversion`) the
/// command works on the given image instead of generating one from noise: the prompt describes the
/// image, and the run replays the image's inversion.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// Work on this image (PNG, JPEG or WebP) instead of generating one: it is fitted to the
    /// model's size (`--fit`) and inverted with `--prompt` as its description.
    #[arg(long, value_name = "IMG")]
    pub image: Option<PathBuf>,
    /// How `--image` is inverted: ddim, null-text, negative-prompt, direct or ddpm (default:
    /// direct).
    #[arg(
        long,
        value_name = "METHOD",
        value_parser = parse_method,
        requires = "image",
        conflicts_with = "inversion"
    )]
    pub inversion_method: Option<InversionMethod>,
    /// Replay this saved inversion (`attend invert`'s `inversion.safetensors`) instead of
    /// inverting: it must come from the same model, size and prompt (and from `--image`, when
    /// given). Its steps and guidance are the run's.
    #[arg(long, value_name = "FILE")]
    pub inversion: Option<PathBuf>,
    /// How `--image` is fitted to the model's size: crop (cover, cut the overflow), pad (fit
    /// inside, grey borders) or stretch.
    #[arg(long, value_name = "crop|pad|stretch", value_parser = parse_fit, default_value = "crop")]
    pub fit: ImageFit,
}

impl ImageArgs {
    /// Checks the flags and the prompt and decodes the image, before the model loads. `None`
    /// when neither `--image` nor `--inversion` is given (the command generates from noise).
    pub fn read(&self, prompt: &str) -> anyhow::Result<Option<ImageInput>> {
        if self.image.is_none() && self.inversion.is_none() {
            return Ok(None);
        }
        check_image_prompt(prompt)?;
        if let Some(path) = &self.inversion {
            anyhow::ensure!(
                path.is_file(),
                "--inversion {}: no such file",
                path.display()
            );
        }
        let image = self
            .image
            .as_ref()
            .map(|path| Ok::<_, anyhow::Error>((path.clone(), read_image_file(path)?)))
            .transpose()?;
        Ok(Some(ImageInput {
            image,
            method: self.inversion_method.unwrap_or(DEFAULT_INVERSION_METHOD),
            inversion_file: self.inversion.clone(),
            fit: self.fit,
        }))
    }
}

/// A checked image input, ready for [`obtain_inversion`].
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// The image file and its decoded pixels (any size), when `--image` is given.
    pub image: Option<(PathBuf, RgbImage)>,
    /// How the image is inverted (ignored with a saved inversion).
    pub method: InversionMethod,
    /// A saved inversion to load instead of inverting.
    pub inversion_file: Option<PathBuf>,
    /// How the image is fitted to the run's size.
    pub fit: ImageFit,
}

impl ImageInput {
    /// An input that inverts `image` (already decoded) with `method`.
    pub fn from_image(
        path: PathBuf,
        image: RgbImage,
        method: InversionMethod,
        fit: ImageFit,
    ) -> Self {
        Self {
            image: Some((path, image)),
            method,
            inversion_file: None,
            fit,
        }
    }
}

/// `--prompt` of a real image must describe it: an empty prompt is refused.
pub fn check_image_prompt(prompt: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !prompt.trim().is_empty(),
        "--prompt is empty: working on a given image needs a description of it (the source \
         prompt its inversion and edits start from)"
    );
    Ok(())
}

/// Decodes an image file, the error naming `--image` and the file.
pub fn read_image_file(path: &Path) -> anyhow::Result<RgbImage> {
    anyhow::ensure!(path.is_file(), "--image {}: no such file", path.display());
    read_image(path).context("--image")
}

/// What an inversion is made for: the source prompt, the run's steps and guidance, the seed of
/// `ddpm`'s noise and the run's size in pixels.
#[derive(Debug, Clone)]
pub struct InversionSettings {
    /// The source prompt (the image's description).
    pub prompt: String,
    /// DDIM steps.
    pub steps: usize,
    /// Guidance scale of the replay.
    pub guidance: f64,
    /// Seed of `ddpm`'s noise draws.
    pub seed: u64,
    /// Width of the run in pixels (the image is fitted to it).
    pub width: usize,
    /// Height of the run in pixels.
    pub height: usize,
}

impl InversionSettings {
    /// The settings of a run that would otherwise generate `request`.
    pub fn from_request(request: &GenerateRequest) -> Self {
        Self {
            prompt: request.prompt.clone(),
            steps: request.steps,
            guidance: request.guidance,
            seed: request.seed,
            width: request.width,
            height: request.height,
        }
    }
}

/// An inversion ready to replay, with the fitted image it came from (when the image was given).
pub struct PreparedImage {
    /// The inversion.
    pub inversion: Arc<Inversion>,
    /// The image fitted to the run's size (`None` when only a saved inversion was given).
    pub fitted: Option<FittedImage>,
    /// True when the inversion was loaded from a file rather than computed.
    pub loaded: bool,
}

/// Turns a checked image input into an inversion for `model`: loads and checks the saved one
/// (same model, size, prompt and, with an image, the same fitted pixels), or fits and inverts the
/// image, printing progress to stderr unless `quiet`.
pub fn obtain_inversion(
    model: &StableDiffusion,
    input: &ImageInput,
    settings: &InversionSettings,
    quiet: bool,
) -> anyhow::Result<PreparedImage> {
    Ok(obtain_inversion_recording(model, input, settings, None, quiet)?.0)
}

/// [`obtain_inversion`] for an edit: with `record` (the replay's request template and what to
/// record), an image inverted now with a method whose guided pass is the source branch
/// ([`InversionMethod::records_source_while_inverting`]) comes back with that branch's run and
/// recording ([`invert_recording_source`]), so the edit runs only its edited branch. `None`
/// otherwise (a loaded inversion, another method, no `record`).
pub fn obtain_inversion_recording(
    model: &StableDiffusion,
    input: &ImageInput,
    settings: &InversionSettings,
    record: Option<(&GenerateRequest, RecordConfig)>,
    quiet: bool,
) -> anyhow::Result<(PreparedImage, Option<InvertedSource>)> {
    let fitted = input
        .image
        .as_ref()
        .map(|(path, image)| {
            fit_image(image, settings.width, settings.height, input.fit).with_context(|| {
                format!(
                    "--image {}: cannot fit it to {}x{} px",
                    path.display(),
                    settings.width,
                    settings.height
                )
            })
        })
        .transpose()?;
    if let Some(path) = &input.inversion_file {
        let inversion = load_checked_inversion(model, path, settings, fitted.as_ref(), input)?;
        return Ok((
            PreparedImage {
                inversion: Arc::new(inversion),
                fitted,
                loaded: true,
            },
            None,
        ));
    }
    let Some(fitted) = fitted else {
        anyhow::bail!("no --image to invert");
    };
    let request = InversionRequest {
        prompt: settings.prompt.clone(),
        method: input.method,
        steps: settings.steps,
        guidance: settings.guidance,
        seed: settings.seed,
    };
    let started = Instant::now();
    let mut on_step = |progress: &InversionProgress| {
        if !quiet {
            eprint!(
                "\r{}: step {}/{}  {:.1} s   ",
                progress.phase,
                progress.steps_done,
                progress.step_count,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    let cancel = CancelToken::new();
    let (inversion, inverted) = match record {
        Some((template, record)) if input.method.records_source_while_inverting() => {
            let inverted = invert_recording_source(
                model,
                &fitted.image,
                &request,
                template,
                record,
                &mut on_step,
                &cancel,
            )
            .with_context(|| format!("cannot invert the image with {}", input.method))?;
            (Arc::clone(&inverted.inversion), Some(inverted))
        }
        _ => (
            invert(model, &fitted.image, &request, &mut on_step, &cancel)
                .with_context(|| format!("cannot invert the image with {}", input.method))?,
            None,
        ),
    };
    if !quiet {
        eprintln!(
            "\rinverted ({}, {} steps) in {:.1} s{}",
            input.method,
            settings.steps,
            started.elapsed().as_secs_f64(),
            " ".repeat(20)
        );
    }
    Ok((
        PreparedImage {
            inversion,
            fitted: Some(fitted),
            loaded: false,
        },
        inverted,
    ))
}

/// Loads a saved inversion and checks that it fits the run: the model (checked by
/// [`Inversion::load`]), the size, the prompt and, with `--image`, the fitted pixels.
fn load_checked_inversion(
    model: &StableDiffusion,
    path: &Path,
    settings: &InversionSettings,
    fitted: Option<&FittedImage>,
    input: &ImageInput,
) -> anyhow::Result<Inversion> {
    let inversion =
        Inversion::load(path, model).with_context(|| format!("--inversion {}", path.display()))?;
    let file = path.display();
    anyhow::ensure!(
        inversion.model_name == model.name(),
        "--inversion {file}: it was made with the model {:?}, not {:?}",
        inversion.model_name,
        model.name()
    );
    let (width, height) = inversion.size_px;
    anyhow::ensure!(
        (width, height) == (settings.width, settings.height),
        "--inversion {file}: it was made at {width}x{height} px, this run is {}x{} px",
        settings.width,
        settings.height
    );
    anyhow::ensure!(
        inversion.request.prompt == settings.prompt,
        "--inversion {file}: it was made for the prompt {:?}, not {:?} (the source prompt must be \
         the one the image was inverted with)",
        inversion.request.prompt,
        settings.prompt
    );
    if let (Some(fitted), Some((image_path, _))) = (fitted, &input.image) {
        anyhow::ensure!(
            image_hash(&fitted.image) == inversion.image_hash,
            "--inversion {file}: it was made from another image than --image {} fitted with \
             --fit {} (image hash {} in the file, {} here)",
            image_path.display(),
            fit_name(input.fit),
            inversion.image_hash,
            image_hash(&fitted.image)
        );
    }
    Ok(inversion)
}

/// Refuses the flags a replay of an inversion cannot honour (another scheduler, initial noise, a
/// negative prompt), naming them; checked before the inversion runs.
pub fn check_replayable(request: &GenerateRequest) -> anyhow::Result<()> {
    if let Some(kind) = request.scheduler {
        anyhow::ensure!(
            kind == SchedulerKind::Ddim,
            "--scheduler {}: a given image replays its inversion on DDIM's timesteps (leave \
             --scheduler out or name ddim)",
            kind.name()
        );
    }
    anyhow::ensure!(
        request.init_latents.is_none(),
        "--init-latents cannot be used with a given image: the run starts from the image's \
         inversion"
    );
    anyhow::ensure!(
        request.negative_prompt.is_empty(),
        "--negative-prompt cannot be used with a given image: the inversion fixes the \
         unconditional branch"
    );
    Ok(())
}

/// Makes `request` replay `inversion`: its prompt's image regenerates. Steps, guidance, seed and
/// size come from the inversion, the scheduler is DDIM (the inversion's timesteps). Refuses what
/// [`check_replayable`] refuses.
pub fn replay_inversion(
    request: &mut GenerateRequest,
    inversion: &Arc<Inversion>,
) -> anyhow::Result<()> {
    check_replayable(request)?;
    request.steps = inversion.request.steps;
    request.guidance = inversion.request.guidance;
    request.seed = inversion.request.seed;
    (request.width, request.height) = inversion.size_px;
    request.scheduler = Some(SchedulerKind::Ddim);
    request.inversion = Some(Arc::clone(inversion));
    Ok(())
}

/// Checks, then inverts (or loads) and makes `request` replay the result: what `edit`, `segment`
/// and `generate` do with a given image. The inversion is made for `request`'s prompt, steps,
/// guidance, seed and size.
pub fn replay_given_image(
    model: &StableDiffusion,
    input: &ImageInput,
    request: &mut GenerateRequest,
    quiet: bool,
) -> anyhow::Result<PreparedImage> {
    check_replayable(request)?;
    let settings = InversionSettings::from_request(request);
    let prepared = obtain_inversion(model, input, &settings, quiet)?;
    note_replay_settings(&prepared, request.steps, request.guidance, quiet);
    replay_inversion(request, &prepared.inversion)?;
    Ok(prepared)
}

/// Prints a note when a loaded inversion's steps or guidance differ from the flags (the
/// inversion's are used).
pub fn note_replay_settings(prepared: &PreparedImage, steps: usize, guidance: f64, quiet: bool) {
    let request = &prepared.inversion.request;
    if prepared.loaded && !quiet && (request.steps != steps || request.guidance != guidance) {
        eprintln!(
            "note: the inversion was made with {} steps at guidance {}; the replay uses those \
             (--steps and --guidance do not apply to a saved inversion)",
            request.steps, request.guidance
        );
    }
}

/// The peak signal-to-noise ratio of `image` against `reference` in dB over 8-bit RGB, and the
/// mean absolute difference per channel value. `None` for the PSNR when the images are identical
/// (infinite). Errors when the sizes differ.
pub fn psnr_db(image: &RgbImage, reference: &RgbImage) -> anyhow::Result<(Option<f64>, f64)> {
    let difference = image_difference(image, reference)?;
    let psnr = Some(difference.psnr_db).filter(|psnr| psnr.is_finite());
    Ok((psnr, difference.mean_abs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_known_differences() {
        let reference = RgbImage {
            width: 2,
            height: 1,
            pixels: vec![0, 0, 0, 255, 255, 255],
        };
        assert_eq!(psnr_db(&reference, &reference).unwrap(), (None, 0.0));
        let mut image = reference.clone();
        // Every value off by 1: MSE 1, PSNR 20 log10(255).
        for value in &mut image.pixels {
            *value = if *value == 0 { 1 } else { 254 };
        }
        let (psnr, mean) = psnr_db(&image, &reference).unwrap();
        let expected = 20.0 * 255f64.log10();
        assert!((psnr.unwrap() - expected).abs() < 1e-9, "{psnr:?}");
        assert_eq!(mean, 1.0);
        let other = RgbImage::black(1, 1);
        assert!(psnr_db(&other, &reference).is_err());
    }

    #[test]
    fn fits_and_methods_parse() {
        assert_eq!(parse_fit("Pad"), Ok(ImageFit::Pad));
        assert!(parse_fit("zoom")
            .unwrap_err()
            .contains("crop, pad or stretch"));
        for fit in [ImageFit::Crop, ImageFit::Pad, ImageFit::Stretch] {
            assert_eq!(parse_fit(fit_name(fit)), Ok(fit));
        }
        assert_eq!(
            parse_methods("ddim, direct").unwrap(),
            vec![InversionMethod::Ddim, InversionMethod::Direct]
        );
        assert!(parse_methods("ddim,magic").unwrap_err().contains("magic"));
        assert!(parse_methods(" , ").is_err());
        assert!(check_image_prompt("  ").is_err());
        assert!(check_image_prompt("a red circle").is_ok());
    }
}
