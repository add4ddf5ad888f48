//! `attend appearance-transfer`: the structure image's layout drawn with the appearance image's
//! look (cross-image attention); writes the output, both reconstructions, the masks and a report.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::appearance::LabelledMask;
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::analysis::image::{fit_image, read_image, ImageFit, RgbImage};
use attend::analysis::segment::write_mask_png;
use attend::attention::appearance_sampling::{
    AppearanceSettings, AppearanceTransferOutput, AppearanceTransferRequest, AppearanceTransferRun,
};
use attend::hook::CancelToken;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::PipelineError;

use super::checks::{at_least_one, non_negative, warn_unknown_words, OutDir};
use super::images::parse_fit;
use super::{load_model, ModelArgs};

/// Arguments of `attend appearance-transfer`. Flag names are stable: scripts rely on them.
#[derive(Debug, clap::Args)]
pub struct AppearanceTransferArgs {
    /// The image whose layout (shapes and places) the output keeps (PNG, JPEG or WebP).
    #[arg(long, value_name = "IMG")]
    pub structure: PathBuf,
    /// A description of the structure image; its nouns name the parts that are matched.
    #[arg(long, value_name = "P")]
    pub structure_prompt: String,
    /// The image whose look (colours, textures, background) the output takes.
    #[arg(long, value_name = "IMG")]
    pub appearance: PathBuf,
    /// A description of the appearance image.
    #[arg(long, value_name = "P")]
    pub appearance_prompt: String,
    #[command(flatten)]
    pub transfer: TransferFlags,
    /// Seed of the inversions' noise (structure: S, appearance: S + 1).
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub seed: u64,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Run size in pixels (default: the model's); both images are fitted to it.
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// Run height in pixels (default: the model's).
    #[arg(long, value_parser = at_least_one, allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// How each image is fitted to the run's size: crop, pad or stretch.
    #[arg(long, value_name = "crop|pad|stretch", value_parser = parse_fit, default_value = "crop")]
    pub fit: ImageFit,
    /// Folder for output.png, structure.png, appearance.png (the reconstructions), the masks
    /// (`structure_mask_<label>.png`, `appearance_mask_<label>.png`) and report.json.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The transfer settings (shared with `attend appearance-eval`).
#[derive(Debug, Clone, clap::Args)]
pub struct TransferFlags {
    /// Steps of the inversions and the run.
    #[arg(long, default_value_t = AppearanceSettings::default().steps, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Fraction of the steps skipped before the output starts from the structure, 0..1.
    #[arg(long, default_value_t = AppearanceSettings::default().skip_fraction, allow_hyphen_values = true)]
    pub skip: f64,
    /// Attention contrast of the output's map over the appearance (1: none).
    #[arg(long, default_value_t = AppearanceSettings::default().contrast, allow_hyphen_values = true)]
    pub contrast: f64,
    /// Swap guidance scale at the start of its range; it falls linearly to half (at least 1).
    /// 1 turns swap guidance off.
    #[arg(long, default_value_t = AppearanceSettings::default().swap_guidance_start, allow_hyphen_values = true)]
    pub swap_guidance: f64,
    /// No masked AdaIN of the output's latent (and no segmentation).
    #[arg(long)]
    pub no_adain: bool,
}

impl TransferFlags {
    /// The settings, checked; the error names the flag.
    pub fn settings(&self) -> anyhow::Result<AppearanceSettings> {
        let settings = AppearanceSettings {
            steps: self.steps,
            skip_fraction: self.skip,
            contrast: self.contrast,
            swap_guidance_start: self.swap_guidance,
            swap_guidance_end: (self.swap_guidance / 2.0).max(1.0),
            adain: !self.no_adain,
            ..AppearanceSettings::default()
        };
        settings.validate().map_err(|error| {
            let flag = match &error {
                PipelineError::InvalidArgument { name: "steps", .. } => "--steps",
                PipelineError::InvalidArgument { name: "skip", .. } => "--skip",
                PipelineError::InvalidArgument {
                    name: "contrast", ..
                } => "--contrast",
                _ => "--swap-guidance",
            };
            anyhow::anyhow!("{flag}: {error}")
        })?;
        Ok(settings)
    }
}

/// The fixed output files.
const FIXED_FILES: [&str; 4] = [
    "output.png",
    "structure.png",
    "appearance.png",
    "report.json",
];

/// The file of a mask: `<image>_mask_<label>.png`, the label reduced to `[a-z0-9_-]`.
pub fn mask_file_name(image: &str, label: &str) -> String {
    let safe: String = label
        .trim()
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
                character.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let safe = if safe.is_empty() {
        "segment".to_string()
    } else {
        safe
    };
    format!("{image}_mask_{safe}.png")
}

/// Decodes an image file, the error naming `flag` and the file.
fn read_flag_image(flag: &str, path: &std::path::Path) -> anyhow::Result<RgbImage> {
    anyhow::ensure!(path.is_file(), "{flag} {}: no such file", path.display());
    read_image(path).with_context(|| format!("{flag} {}", path.display()))
}

/// Run `attend appearance-transfer`.
pub fn run(args: &AppearanceTransferArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.structure_prompt.trim().is_empty(),
        "--structure-prompt is empty: describe the structure image (its nouns name the parts \
         to match)"
    );
    anyhow::ensure!(
        !args.appearance_prompt.trim().is_empty(),
        "--appearance-prompt is empty: describe the appearance image (its nouns name the parts \
         to match)"
    );
    let settings = args.transfer.settings()?;
    let structure = read_flag_image("--structure", &args.structure)?;
    let appearance = read_flag_image("--appearance", &args.appearance)?;
    let mut out_dir = OutDir::check("--out-dir", &args.out_dir)?;
    out_dir.check_files(&FIXED_FILES)?;

    let model = load_model(&args.model)?;
    warn_unknown_words(&model, "--structure-prompt", &args.structure_prompt)?;
    warn_unknown_words(&model, "--appearance-prompt", &args.appearance_prompt)?;
    let (default_width, default_height) = model.default_size_px();
    let width = args.width.unwrap_or(default_width);
    let height = args.height.unwrap_or(default_height);
    let fit = |flag: &str, image: &RgbImage| -> anyhow::Result<RgbImage> {
        Ok(fit_image(image, width, height, args.fit)
            .with_context(|| format!("{flag}: cannot fit the image to {width}x{height}"))?
            .image)
    };
    let request = AppearanceTransferRequest {
        structure: fit("--structure", &structure)?,
        structure_prompt: args.structure_prompt.clone(),
        appearance: fit("--appearance", &appearance)?,
        appearance_prompt: args.appearance_prompt.clone(),
        settings,
        seed: args.seed,
    };
    let started = Instant::now();
    let cancel = CancelToken::new();
    if !args.quiet {
        eprint!("inverting and segmenting both images...");
    }
    let mut run = AppearanceTransferRun::new(&model, &request, &cancel)
        .context("cannot prepare the appearance transfer")?;
    while let Some(report) = run.step()? {
        if !args.quiet {
            eprint!(
                "\rstep {}/{}  {:.1} s      ",
                report.step_index + 1,
                report.step_count,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let output = run.finish()?;
    let seconds = started.elapsed().as_secs_f64();
    if !args.quiet {
        eprintln!("\rdone in {seconds:.1} s{}", " ".repeat(30));
    }
    for warning in &output.warnings {
        eprintln!("warning: {warning}");
    }
    out_dir.create()?;
    write_outputs(args, &model, &request, &output, seconds)?;
    out_dir.keep();
    Ok(())
}

/// Writes every file (each atomically).
fn write_outputs(
    args: &AppearanceTransferArgs,
    model: &StableDiffusion,
    request: &AppearanceTransferRequest,
    output: &AppearanceTransferOutput,
    seconds: f64,
) -> anyhow::Result<()> {
    let dir = &args.out_dir;
    for (name, image) in [
        ("output.png", &output.output),
        ("structure.png", &output.structure_reconstruction),
        ("appearance.png", &output.appearance_reconstruction),
    ] {
        write_png_rgb(
            &dir.join(name),
            image.width,
            image.height,
            &image.pixels,
            None,
        )?;
    }
    let mut mask_files = Vec::new();
    for (image, masks) in [
        ("structure", &output.masks.structure),
        ("appearance", &output.masks.appearance),
    ] {
        for LabelledMask { label, mask } in masks {
            let name = mask_file_name(image, label);
            write_mask_png(&dir.join(&name), mask)?;
            mask_files.push(serde_json::json!({ "image": image, "label": label, "file": name }));
        }
    }
    let report = serde_json::json!({
        "model": model.name(),
        "structure": args.structure.display().to_string(),
        "structure_prompt": request.structure_prompt,
        "appearance": args.appearance.display().to_string(),
        "appearance_prompt": request.appearance_prompt,
        "seed": request.seed,
        "size_px": [request.structure.width, request.structure.height],
        "settings": request.settings,
        "seconds": seconds,
        "preparation_seconds": output.preparation_seconds,
        "masks": mask_files,
        "correspondence_layer_calls": output.correspondence.layer_calls,
        "warnings": output.warnings,
    });
    let text = serde_json::to_string_pretty(&report)?;
    write_atomically(&dir.join("report.json"), |writer| {
        use std::io::Write as _;
        writer.write_all(text.as_bytes())?;
        writer.write_all(b"\n")
    })?;
    Ok(())
}
