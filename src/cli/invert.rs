//! `attend invert`: inverts a given image with a prompt that describes it, then regenerates it from
//! the inversion (a plain generation that replays it) and reports how close the reconstruction is.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use attend::analysis::export::{a1111_parameters, write_atomically, write_png_rgb};
use attend::analysis::image::{image_hash, ImageFit};
use attend::hook::CancelToken;
use attend::pipeline::inversion::InversionMethod;
use attend::pipeline::sampling::{generate, GenerateRequest};

use super::checks::{at_least_one, non_negative, warn_unknown_words, OutDir};
use super::generate::generation_parameters;
use super::images::{
    fit_name, obtain_inversion, parse_fit, parse_method, psnr_db, read_image_file,
    replay_inversion, ImageInput, InversionSettings, DEFAULT_INVERSION_METHOD,
};
use super::{load_model, ModelArgs};

/// The files `attend invert` writes into `--out-dir`.
pub const INVERT_FILES: [&str; 4] = [
    "input.png",
    "reconstruction.png",
    "inversion.safetensors",
    "report.json",
];

/// Arguments of `attend invert`.
#[derive(Debug, clap::Args)]
pub struct InvertArgs {
    /// The image (PNG, JPEG or WebP).
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// A description of the image (the source prompt of later edits); must not be empty.
    #[arg(long)]
    pub prompt: String,
    /// Inversion method: ddim, null-text, negative-prompt, direct or ddpm (default: direct).
    #[arg(long, value_name = "METHOD", value_parser = parse_method)]
    pub method: Option<InversionMethod>,
    /// DDIM steps of the inversion (later edits replay with the same count).
    #[arg(long, default_value_t = 30, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Guidance scale later runs replay with.
    #[arg(long, default_value_t = 7.5, allow_hyphen_values = true)]
    pub guidance: f64,
    /// How the image is fitted to the model's size: crop, pad or stretch.
    #[arg(long, value_name = "crop|pad|stretch", value_parser = parse_fit, default_value = "crop")]
    pub fit: ImageFit,
    /// Run width in pixels (default: the model's); the image is fitted to it.
    #[arg(long, value_name = "PX")]
    pub width: Option<usize>,
    /// Run height in pixels (default: the model's).
    #[arg(long, value_name = "PX")]
    pub height: Option<usize>,
    /// Seed of `ddpm`'s noise draws.
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub seed: u64,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder for `input.png` (the image fitted to the model's size), `reconstruction.png`,
    /// `inversion.safetensors` and `report.json`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Run `attend invert`.
pub fn run(args: &InvertArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.guidance.is_finite(),
        "invalid --guidance: {} is not a finite number",
        args.guidance
    );
    super::images::check_image_prompt(&args.prompt)?;
    let mut out_dir = OutDir::check("--out-dir", &args.out_dir)?;
    out_dir.check_files(&INVERT_FILES)?;
    let method = args.method.unwrap_or(DEFAULT_INVERSION_METHOD);
    let image = read_image_file(&args.image)?;
    let (source_width, source_height) = (image.width, image.height);
    let input = ImageInput::from_image(args.image.clone(), image, method, args.fit);

    let model = load_model(&args.model)?;
    warn_unknown_words(&model, "--prompt", &args.prompt)?;
    let (default_width, default_height) = model.default_size_px();
    let (width, height) = (
        args.width.unwrap_or(default_width),
        args.height.unwrap_or(default_height),
    );
    let settings = InversionSettings {
        prompt: args.prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        width,
        height,
    };
    let started = Instant::now();
    let prepared = obtain_inversion(&model, &input, &settings, args.quiet)?;
    let inversion_seconds = started.elapsed().as_secs_f64();
    let Some(fitted) = &prepared.fitted else {
        anyhow::bail!("no fitted image after inverting --image");
    };

    let mut request = GenerateRequest::new(&model, args.prompt.clone());
    replay_inversion(&mut request, &prepared.inversion)?;
    let started = Instant::now();
    let quiet = args.quiet;
    let mut on_step = |report: &attend::pipeline::sampling::StepReport| {
        if !quiet {
            eprint!(
                "\rreconstructing: step {}/{}  {:.1} s   ",
                report.step_index + 1,
                report.step_count,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    let output = generate(&model, &request, None, &mut on_step, &CancelToken::new())?;
    let reconstruction_seconds = started.elapsed().as_secs_f64();
    for warning in &output.warnings {
        eprintln!("warning: {warning}");
    }
    let (psnr, mean_abs) = psnr_db(&output.image, &fitted.image)?;
    if !quiet {
        eprintln!(
            "\rreconstructed in {reconstruction_seconds:.1} s: PSNR {}, mean difference {mean_abs:.2} \
             of 255{}",
            psnr.map_or("infinite (identical)".to_string(), |db| format!("{db:.2} dB")),
            " ".repeat(20)
        );
    }

    let report = serde_json::json!({
        "image": args.image.display().to_string(),
        "prompt": args.prompt,
        "model": model.name(),
        "method": method.name(),
        "steps": prepared.inversion.request.steps,
        "guidance": prepared.inversion.request.guidance,
        "seed": prepared.inversion.request.seed,
        "fit": fit_name(args.fit),
        "source_size_px": [source_width, source_height],
        "size_px": [fitted.image.width, fitted.image.height],
        "image_hash": image_hash(&fitted.image),
        "psnr_db": psnr,
        "mean_abs_difference": mean_abs,
        "inversion_seconds": inversion_seconds,
        "reconstruction_seconds": reconstruction_seconds,
    });
    let text = serde_json::to_string_pretty(&report)?;
    let mut parameters = generation_parameters(&model, &request, &output);
    parameters
        .extra
        .push(("Inversion".to_string(), method.name().to_string()));
    let out = out_dir.create()?.to_path_buf();
    write_png_rgb(
        &out.join("input.png"),
        fitted.image.width,
        fitted.image.height,
        &fitted.image.pixels,
        Some(&format!(
            "{} fitted with --fit {}",
            args.image.display(),
            fit_name(args.fit)
        )),
    )?;
    prepared
        .inversion
        .save(&out.join("inversion.safetensors"))?;
    write_png_rgb(
        &out.join("reconstruction.png"),
        output.image.width,
        output.image.height,
        &output.image.pixels,
        Some(&a1111_parameters(&parameters)),
    )?;
    write_atomically(&out.join("report.json"), |file| {
        file.write_all(text.as_bytes())
    })?;
    if !quiet {
        eprintln!("wrote {}", out.display());
    }
    out_dir.keep();
    Ok(())
}
