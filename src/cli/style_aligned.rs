//! `attend style-aligned`: a reference prompt and target prompts generated as one batch, the
//! targets taking the reference's style through shared self-attention (Style Aligned).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::export::{a1111_parameters, write_attention_safetensors, write_png_rgb};
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::attention::style_aligned::StyleAlignedConfig;
use attend::attention::style_sampling::{
    StyleSetOutput, StyleSetRequest, StyleSetRun, StyleStepReport,
};
use attend::hook::{AttentionProcessor, CancelToken, ChainedProcessors};
use attend::pipeline::limits::RunCapture;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{run_to_end, GenerateOutput, RgbImage};

use super::checks::{warn_unknown_words, OutDir};
use super::generate::{daam_heatmaps, generation_parameters};
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

/// The shared-attention settings (shared with `attend style-eval`).
#[derive(Debug, Clone, clap::Args)]
pub struct StyleFlags {
    /// Added to the logits of the reference's keys in the targets' attention (the reference's
    /// image-reference notebook uses ln 2 = 0.693).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub shift: f32,
    /// The reference's keys are multiplied by this in the targets' attention.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub scale: f32,
    /// Keep every group norm per image (by default the targets' group norms include the reference).
    #[arg(long)]
    pub no_share_group_norm: bool,
    /// Fraction of the self-attention layers left plain (evenly spaced), 0..1.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub only_self_level: f64,
    /// AdaIN of the targets' values too.
    #[arg(long)]
    pub adain_values: bool,
}

impl StyleFlags {
    /// The settings, checked.
    pub fn config(&self) -> anyhow::Result<StyleAlignedConfig> {
        let config = StyleAlignedConfig {
            share_group_norm: !self.no_share_group_norm,
            shared_score_scale: self.scale,
            shared_score_shift: self.shift,
            only_self_level: self.only_self_level,
            adain_values: self.adain_values,
            ..StyleAlignedConfig::default()
        };
        config.validate().map_err(|error| {
            let flag = if error.to_string().contains("only_self_level") {
                "--only-self-level"
            } else if error.to_string().contains("scale") {
                "--scale"
            } else {
                "--shift"
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
    let config = args.style.config()?;
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
    let request = StyleSetRequest {
        generate: args.sampling.request(&model, &args.reference_prompt)?,
        target_prompts: args.prompts.clone(),
        sharing: (!args.independent).then_some(config),
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
