//! `attend style-aligned`: a reference prompt and target prompts generated as one batch, the
//! targets taking the reference's style through shared self-attention (Style Aligned).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::export::{a1111_parameters, write_attention_safetensors, write_png_rgb};
use attend::analysis::image::{fit_image, read_image, ImageFit};
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::attention::style_aligned::{StyleAlignedConfig, StyleAlignedError};
use attend::attention::style_sampling::{
    invert_reference_image, StyleReferenceImage, StyleSetOutput, StyleSetRequest, StyleSetRun,
    StyleStepReport, REFERENCE_INVERSION_GUIDANCE,
};
use attend::hook::{AttentionProcessor, CancelToken, ChainedProcessors};
use attend::pipeline::inversion::InversionProgress;
use attend::pipeline::limits::RunCapture;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{run_to_end, GenerateOutput, GenerateRequest, RgbImage};

use super::checks::{warn_unknown_words, OutDir};
use super::generate::{daam_heatmaps, generation_parameters};
use super::images::parse_fit;
use super::{load_model, ModelArgs, SamplingArgs};

/// Arguments of `attend style-aligned`. Flag names are stable: scripts rely on them.
#[derive(Debug, clap::Args)]
pub struct StyleAlignedArgs {
    /// The reference image's prompt (its style is shared).
    #[arg(long)]
    pub reference_prompt: String,
    /// A target prompt; repeatable (written as 1.png, 2.png, ... in this order).
    #[arg(long = "prompt", value_name = "PROMPT")]
    pub prompts: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed (the reference's; target i uses seed + i), steps, guidance, scheduler, size, negative
    /// prompt and the reference's initial noise.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub style: StyleFlags,
    /// A real image as the reference (PNG, JPEG or WebP), described by --reference-prompt: it is
    /// inverted with DDIM at guidance 2 and the reference row follows its trajectory
    /// (`reference.png` is then its reconstruction). The set runs on DDIM.
    #[arg(long, value_name = "IMG")]
    pub reference_image: Option<PathBuf>,
    /// How --reference-image is fitted to the set's size: crop, pad or stretch.
    #[arg(long, default_value = "crop", value_parser = parse_fit)]
    pub fit: ImageFit,
    /// Generate every image independently (no sharing; the same seeds): the baseline.
    #[arg(long)]
    pub independent: bool,
    /// Also write `reference_attention.safetensors`, `1_attention.safetensors`, ... (the layout
    /// of `attend generate --attention-out`).
    #[arg(long)]
    pub attention_out: bool,
    /// Folder for `reference.png`, `1.png` ... `N.png` and `grid.png`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// The shared-attention settings (shared with `attend style-eval`). Without
/// `--reference-settings` they start from attend's measured default
/// ([`StyleAlignedConfig::measured_default`]); each flag given overrides one setting.
#[derive(Debug, Clone, clap::Args)]
pub struct StyleFlags {
    /// Start from the reference code's settings (shift 0, every layer, every step) instead of
    /// attend's measured default.
    #[arg(long)]
    pub reference_settings: bool,
    /// Added to the logits of the reference's keys in the targets' attention (default: the
    /// starting settings', ln 2 = 0.693 with --reference-image as the reference's notebook).
    #[arg(long, allow_hyphen_values = true)]
    pub shift: Option<f32>,
    /// The reference's keys are multiplied by this in the targets' attention (below 1: the
    /// reference weighs less).
    #[arg(long, allow_hyphen_values = true)]
    pub scale: Option<f32>,
    /// Keep every group norm per image (by default the targets' group norms include the reference).
    #[arg(long)]
    pub no_share_group_norm: bool,
    /// Fraction of the self-attention layers left plain (evenly spaced), 0..1.
    #[arg(long, allow_hyphen_values = true)]
    pub only_self_level: Option<f64>,
    /// AdaIN of the targets' values too.
    #[arg(long)]
    pub adain_values: bool,
    /// No AdaIN of the targets' queries (they keep their own statistics; attend's default).
    #[arg(long, conflicts_with = "adain_queries")]
    pub no_adain_queries: bool,
    /// AdaIN of the targets' queries to the reference's (the reference's setting).
    #[arg(long)]
    pub adain_queries: bool,
    /// No AdaIN of the targets' keys.
    #[arg(long)]
    pub no_adain_keys: bool,
    /// The blocks whose self-attention shares, comma-separated: down (encoder), mid, up
    /// (decoder); e.g. `up` shares only in the decoder.
    #[arg(long, value_name = "BLOCKS", value_parser = parse_blocks)]
    pub share_blocks: Option<SharedBlocks>,
    /// Share only in layers whose query grid side (latent pixels) is at least this (attend's
    /// default: 32; 0: no limit).
    #[arg(long, value_name = "SIDE")]
    pub min_shared_side: Option<usize>,
    /// Share only in layers whose query grid side (latent pixels) is at most this (0: no limit).
    #[arg(long, value_name = "SIDE")]
    pub max_shared_side: Option<usize>,
    /// Share (attention and group norms) only in the first fraction of the steps, 0..1.
    #[arg(long, value_name = "FRACTION", allow_hyphen_values = true)]
    pub shared_steps_fraction: Option<f64>,
}

/// Which blocks' self-attention shares (`--share-blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedBlocks {
    /// The down blocks.
    pub encoder: bool,
    /// The middle block.
    pub middle: bool,
    /// The up blocks.
    pub decoder: bool,
}

/// Clap value parser of `--share-blocks`: a comma-separated list of `down`, `mid`, `up`.
pub fn parse_blocks(text: &str) -> Result<SharedBlocks, String> {
    let mut blocks = SharedBlocks {
        encoder: false,
        middle: false,
        decoder: false,
    };
    for name in text.split(',').map(str::trim) {
        match name {
            "down" => blocks.encoder = true,
            "mid" => blocks.middle = true,
            "up" => blocks.decoder = true,
            other => {
                return Err(format!(
                    "unknown block `{other}`; expected a comma-separated list of down, mid, up"
                ))
            }
        }
    }
    Ok(blocks)
}

impl StyleFlags {
    /// The settings, checked; `image_reference`: the reference is a real image (the shift
    /// defaults to ln 2 then, as in the reference's notebook).
    pub fn config(&self, image_reference: bool) -> anyhow::Result<StyleAlignedConfig> {
        let mut config = if self.reference_settings {
            StyleAlignedConfig::default()
        } else {
            StyleAlignedConfig::measured_default()
        };
        if image_reference {
            config.shared_score_shift = std::f32::consts::LN_2;
        }
        if let Some(shift) = self.shift {
            config.shared_score_shift = shift;
        }
        if let Some(scale) = self.scale {
            config.shared_score_scale = scale;
        }
        if self.no_share_group_norm {
            config.share_group_norm = false;
        }
        if let Some(level) = self.only_self_level {
            config.only_self_level = level;
        }
        config.adain_values |= self.adain_values;
        config.adain_queries =
            (config.adain_queries || self.adain_queries) && !self.no_adain_queries;
        config.adain_keys &= !self.no_adain_keys;
        if let Some(blocks) = self.share_blocks {
            config.share_encoder = blocks.encoder;
            config.share_middle = blocks.middle;
            config.share_decoder = blocks.decoder;
        }
        if let Some(side) = self.min_shared_side {
            config.min_shared_side = side;
        }
        if let Some(side) = self.max_shared_side {
            config.max_shared_side = side;
        }
        if let Some(fraction) = self.shared_steps_fraction {
            config.shared_steps_fraction = fraction;
        }
        config.validate().map_err(|error| {
            let StyleAlignedError::InvalidSetting { name, .. } = &error;
            let flag = match *name {
                "only_self_level" => "--only-self-level",
                "shared_score_scale" => "--scale",
                "shared_steps_fraction" => "--shared-steps-fraction",
                "min_shared_side" => "--min-shared-side",
                _ => "--shift",
            };
            anyhow::anyhow!("{flag}: {error}")
        })?;
        Ok(config)
    }
}

/// The file name of image `index` of a set (0: the reference).
pub fn image_file_name(index: usize) -> String {
    if index == 0 {
        "reference.png".to_string()
    } else {
        format!("{index}.png")
    }
}

/// Run `attend style-aligned`.
pub fn run(args: &StyleAlignedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.prompts.is_empty(),
        "no target prompt: give at least one --prompt besides --reference-prompt"
    );
    args.sampling.check()?;
    let config = args.style.config(args.reference_image.is_some())?;
    let reference_source = args
        .reference_image
        .as_deref()
        .map(read_reference_image)
        .transpose()?;
    let mut out_dir = OutDir::check("--out-dir", &args.out_dir)?;
    let mut names: Vec<String> = (0..=args.prompts.len()).map(image_file_name).collect();
    names.push("grid.png".to_string());
    if args.attention_out {
        names.extend((0..=args.prompts.len()).map(attention_file_name));
    }
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    out_dir.check_files(&name_refs)?;

    let model = load_model(&args.model)?;
    warn_unknown_words(&model, "--reference-prompt", &args.reference_prompt)?;
    for prompt in &args.prompts {
        warn_unknown_words(&model, "--prompt", prompt)?;
    }
    let generate = args.sampling.request(&model, &args.reference_prompt)?;
    let reference_image = match (&reference_source, &args.reference_image) {
        (Some(source), Some(path)) => Some(invert_reference(
            &model, &generate, source, path, args.fit, args.quiet,
        )?),
        _ => None,
    };
    let request = StyleSetRequest {
        generate,
        target_prompts: args.prompts.clone(),
        sharing: (!args.independent).then_some(config),
        reference_image,
    };
    let prompts: Vec<&str> = std::iter::once(args.reference_prompt.as_str())
        .chain(args.prompts.iter().map(String::as_str))
        .collect();
    let mut stores = prompts
        .iter()
        .enumerate()
        .map(|(index, prompt)| {
            Ok(AttentionStore::new(StoreConfig {
                keep_self: false,
                batch_item: index,
                ..StoreConfig::new(model.tokenizer.encode(prompt)?.token_count())
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let longest_prompt = stores
        .iter()
        .map(|store| store.config().token_count)
        .max()
        .unwrap_or(0);
    let capture = if args.attention_out {
        RunCapture::store(longest_prompt, 0)
    } else {
        RunCapture::none()
    };
    let cancel = CancelToken::new();
    let mut run = StyleSetRun::new(&model, &request, &capture)
        .context("cannot run the style set")?
        .with_cancel(cancel.clone());
    let started = Instant::now();
    let quiet = args.quiet;
    let mut on_step = |report: &StyleStepReport| {
        if !quiet {
            eprint!(
                "\r{} images: step {}/{}  {:.1} s   ",
                report.latents.len(),
                report.step_index + 1,
                report.step_count,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    if args.attention_out {
        let observers: Vec<&mut dyn AttentionProcessor> = stores
            .iter_mut()
            .map(|store| store as &mut dyn AttentionProcessor)
            .collect();
        let mut chain = ChainedProcessors::new(observers);
        run_to_end(&mut run, Some(&mut chain), &mut on_step, &cancel)?;
    } else {
        run_to_end(&mut run, None, &mut on_step, &cancel)?;
    }
    let output = run.finish()?;
    if !quiet {
        eprintln!(
            "\rdone: {} images in {:.1} s{}",
            prompts.len(),
            started.elapsed().as_secs_f64(),
            " ".repeat(20)
        );
    }
    let mut warnings = output.reference.warnings.clone();
    warnings.dedup();
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    out_dir.create()?;
    write_images(args, &model, &request, &output)?;
    if args.attention_out {
        let runs = std::iter::once(&output.reference).chain(&output.targets);
        for (index, (store, run)) in stores.iter_mut().zip(runs).enumerate() {
            store.finish_step()?;
            let words = &run.prompt_tokens.words;
            let heatmaps = daam_heatmaps(store, words, run.image.height, run.image.width);
            write_attention_safetensors(
                &args.out_dir.join(attention_file_name(index)),
                &store.cross_by_resolution(),
                &heatmaps,
                words,
                &run.prompt_tokens.tokens,
            )?;
        }
    }
    out_dir.keep();
    Ok(())
}

/// Decodes `--reference-image` (before the model loads), the error naming the file.
fn read_reference_image(path: &Path) -> anyhow::Result<RgbImage> {
    anyhow::ensure!(
        path.is_file(),
        "--reference-image {}: no such file",
        path.display()
    );
    read_image(path).with_context(|| format!("--reference-image {}", path.display()))
}

/// Fits the reference image to the set's size and inverts it (DDIM at guidance 2, the set's
/// steps), printing progress unless `quiet`.
fn invert_reference(
    model: &StableDiffusion,
    generate: &GenerateRequest,
    source: &RgbImage,
    path: &Path,
    fit: ImageFit,
    quiet: bool,
) -> anyhow::Result<Arc<StyleReferenceImage>> {
    let fitted = fit_image(source, generate.width, generate.height, fit)
        .with_context(|| format!("--reference-image {}", path.display()))?;
    let started = Instant::now();
    let mut on_step = |progress: &InversionProgress| {
        if !quiet {
            eprint!(
                "\rreference image: {} {}/{}  {:.1} s   ",
                progress.phase,
                progress.steps_done,
                progress.step_count,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    let image = invert_reference_image(
        model,
        &fitted.image,
        &generate.prompt,
        generate.steps,
        REFERENCE_INVERSION_GUIDANCE,
        &mut on_step,
        &CancelToken::new(),
    )
    .with_context(|| format!("cannot invert --reference-image {}", path.display()))?;
    if !quiet {
        eprintln!();
    }
    Ok(image)
}

/// The attention file of image `index` (0: the reference).
fn attention_file_name(index: usize) -> String {
    if index == 0 {
        "reference_attention.safetensors".to_string()
    } else {
        format!("{index}_attention.safetensors")
    }
}

/// Writes every image (each PNG atomically, with its parameters) and the grid.
fn write_images(
    args: &StyleAlignedArgs,
    model: &StableDiffusion,
    request: &StyleSetRequest,
    output: &StyleSetOutput,
) -> anyhow::Result<()> {
    let runs: Vec<&GenerateOutput> = std::iter::once(&output.reference)
        .chain(&output.targets)
        .collect();
    let settings = serde_json::to_string(&request.sharing)?;
    for (index, run) in runs.iter().enumerate() {
        let mut image_request = request.generate.clone();
        image_request.seed = request.seed_of(index);
        if index > 0 {
            image_request
                .prompt
                .clone_from(&request.target_prompts[index - 1]);
            image_request.init_latents = None;
        }
        let mut parameters = generation_parameters(model, &image_request, run);
        parameters
            .extra
            .push(("Style Aligned".to_string(), settings.clone()));
        if index > 0 {
            parameters.extra.push((
                "Style reference prompt".to_string(),
                request.generate.prompt.clone(),
            ));
        }
        if let Some(path) = &args.reference_image {
            parameters.extra.push((
                "Style reference image".to_string(),
                path.display().to_string(),
            ));
        }
        write_png_rgb(
            &args.out_dir.join(image_file_name(index)),
            run.image.width,
            run.image.height,
            &run.image.pixels,
            Some(&a1111_parameters(&parameters)),
        )?;
    }
    let images: Vec<&RgbImage> = runs.iter().map(|run| &run.image).collect();
    let grid = image_row(&images)?;
    write_png_rgb(
        &args.out_dir.join("grid.png"),
        grid.width,
        grid.height,
        &grid.pixels,
        Some("Style Aligned set: the reference, then the targets in prompt order"),
    )?;
    Ok(())
}

/// The images side by side, left to right (all of one size).
pub fn image_row(images: &[&RgbImage]) -> anyhow::Result<RgbImage> {
    let first = images.first().context("no image to put in a grid")?;
    let (width, height) = (first.width, first.height);
    anyhow::ensure!(
        images
            .iter()
            .all(|image| (image.width, image.height) == (width, height)),
        "the set's images differ in size"
    );
    let total_width = width * images.len();
    let mut pixels = vec![0u8; total_width * height * 3];
    for (column, image) in images.iter().enumerate() {
        for row in 0..height {
            let source = &image.pixels[row * width * 3..][..width * 3];
            let start = (row * total_width + column * width) * 3;
            pixels[start..start + width * 3].copy_from_slice(source);
        }
    }
    Ok(RgbImage {
        width: total_width,
        height,
        pixels,
    })
}
