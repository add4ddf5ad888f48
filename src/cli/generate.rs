//! `attend generate`: one image from a prompt, with its attention maps, trajectory and heat maps on request.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use attend::analysis::export::{
    a1111_parameters, write_atomically, write_attention_safetensors, write_png_rgb,
    GenerationParameters,
};
use attend::analysis::heatmap::{word_heatmaps, AggregationSettings, Heatmap};
use attend::analysis::{colormap, WordSpan};
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::CancelToken;
use attend::pipeline::limits::RunCapture;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{generate, prepare_run_with, GenerateOutput, GenerateRequest};

use super::checks::{check_output_file, warn_unknown_words, OutDir};
use super::images::{replay_given_image, ImageArgs};
use super::{load_model, ModelArgs, SamplingArgs};

/// Arguments of `attend generate`. Flag names are stable: scripts rely on them.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The prompt (may be empty: unconditional).
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Work on a given image instead of generating one: `--prompt` describes it, the run replays
    /// its inversion (the image regenerates), so `--attention-out` and `--heatmaps-out` show the
    /// given image's attention.
    #[command(flatten)]
    pub image: ImageArgs,
    /// Write the image (PNG with the generation parameters in a `parameters` text chunk).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write `latents_per_step` `[steps, 1, C, h, w]` and `timesteps` `[steps]` as safetensors.
    #[arg(long)]
    pub trajectory_out: Option<PathBuf>,
    /// Write cross-attention per resolution `cross.<h>x<w>` `[steps, tokens, h, w]`, DAAM word heat maps
    /// `word_heatmaps` `[words, H, W]`, and metadata `words` / `tokens`, as safetensors.
    #[arg(long)]
    pub attention_out: Option<PathBuf>,
    /// Write one PNG per word: its heat map over the image.
    #[arg(long)]
    pub heatmaps_out: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Run `attend generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    args.sampling.check()?;
    let image_input = args.image.read(&args.prompt)?;
    // Fail before the (long) run when an output cannot be written.
    for (flag, path) in [
        ("--out", &args.out),
        ("--trajectory-out", &args.trajectory_out),
        ("--attention-out", &args.attention_out),
    ] {
        if let Some(path) = path {
            check_output_file(flag, path)?;
        }
    }
    let mut heatmaps_out = args
        .heatmaps_out
        .as_deref()
        .map(|dir| OutDir::check("--heatmaps-out", dir))
        .transpose()?;
    let model = load_model(&args.model)?;
    warn_unknown_words(&model, "--prompt", &args.prompt)?;
    let mut request = args.sampling.request(&model, &args.prompt)?;

    let capture = args.attention_out.is_some() || args.heatmaps_out.is_some();
    let token_count = model.tokenizer.encode(&args.prompt)?.token_count();
    if capture {
        // The limits with the store's maps of every step, before the run (it checks them without).
        prepare_run_with(&model, &request, &RunCapture::store(token_count, 0))?;
    }
    if let Some(input) = &image_input {
        replay_given_image(&model, input, &mut request, args.quiet)?;
    }
    let mut store = AttentionStore::new(StoreConfig {
        keep_self: false,
        ..StoreConfig::new(token_count)
    });
    let started = Instant::now();
    let quiet = args.quiet;
    let mut on_step = |report: &attend::pipeline::sampling::StepReport| {
        if !quiet {
            let elapsed = started.elapsed().as_secs_f64();
            let per_step = elapsed / (report.step_index + 1) as f64;
            eprint!(
                "\rstep {}/{}  {:.2} s/step  ETA {:.0} s   ",
                report.step_index + 1,
                report.step_count,
                per_step,
                per_step * (report.step_count - report.step_index - 1) as f64
            );
        }
        Ok(())
    };
    let processor: Option<&mut dyn attend::hook::AttentionProcessor> =
        if capture { Some(&mut store) } else { None };
    let output = generate(
        &model,
        &request,
        processor,
        &mut on_step,
        &CancelToken::new(),
    )?;
    if !quiet {
        eprintln!(
            "\rdone: {} steps in {:.1} s{}",
            request.steps,
            started.elapsed().as_secs_f64(),
            " ".repeat(20)
        );
    }
    for warning in &output.warnings {
        eprintln!("warning: {warning}");
    }
    store.finish_step()?;

    let parameters = a1111_parameters(&generation_parameters(&model, &request, &output));
    if let Some(path) = &args.out {
        let image = &output.image;
        write_png_rgb(
            path,
            image.width,
            image.height,
            &image.pixels,
            Some(&parameters),
        )?;
    }
    if let Some(path) = &args.trajectory_out {
        write_trajectory(path, &output)?;
    }
    if capture {
        let words = &output.prompt_tokens.words;
        let heatmaps = daam_heatmaps(&store, words, output.image.height, output.image.width);
        if let Some(path) = &args.attention_out {
            write_attention_safetensors(
                path,
                &store.cross_by_resolution(),
                &heatmaps,
                words,
                &output.prompt_tokens.tokens,
            )?;
        }
        if let Some(dir) = &mut heatmaps_out {
            write_word_overlays(dir.create()?, &output, &heatmaps)?;
        }
    }
    if let Some(dir) = heatmaps_out {
        dir.keep();
    }
    Ok(())
}

/// DAAM word heat maps at image size over every step (down + up blocks).
pub fn daam_heatmaps(
    store: &AttentionStore,
    words: &[WordSpan],
    height: usize,
    width: usize,
) -> Vec<Heatmap> {
    word_heatmaps(
        store.steps(),
        words,
        &AggregationSettings::default(),
        height,
        width,
    )
}

/// The A1111 parameters of a finished run.
pub fn generation_parameters(
    model: &StableDiffusion,
    request: &GenerateRequest,
    output: &GenerateOutput,
) -> GenerationParameters {
    GenerationParameters {
        prompt: request.prompt.clone(),
        negative_prompt: request.negative_prompt.clone(),
        steps: request.steps,
        sampler: output.scheduler.label().to_string(),
        cfg_scale: request.guidance as f32,
        seed: request.seed,
        width: output.image.width,
        height: output.image.height,
        model: model.name().to_string(),
        extra: Vec::new(),
    }
}

/// One PNG per word: the heat map (inferno) blended over the image.
fn write_word_overlays(
    dir: &Path,
    output: &GenerateOutput,
    heatmaps: &[Heatmap],
) -> anyhow::Result<()> {
    let image = &output.image;
    for (index, heatmap) in heatmaps.iter().enumerate() {
        let rgb = colormap::overlay(
            &image.pixels,
            image.width,
            image.height,
            &heatmap.data,
            colormap::Colormap::Inferno,
            0.6,
            0.0,
        );
        let name = format!("{index:02}_{}.png", file_safe(&heatmap.word));
        write_png_rgb(
            &dir.join(name),
            image.width,
            image.height,
            &rgb,
            Some(&heatmap.word),
        )?;
    }
    Ok(())
}

/// Letters, digits, '-' and '_' of `text`; anything else becomes '_'.
pub fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes `latents_per_step` and `timesteps` as safetensors (f32), atomically.
fn write_trajectory(path: &Path, output: &GenerateOutput) -> anyhow::Result<()> {
    let latents = &output.latents_per_step;
    let latent_values = latents.flatten_all()?.to_vec1::<f32>()?;
    let timesteps: Vec<f32> = output.timesteps.iter().map(|&t| t as f32).collect();
    let latent_bytes: Vec<u8> = latent_values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let timestep_bytes: Vec<u8> = timesteps.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "latents_per_step",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                latents.dims().to_vec(),
                &latent_bytes,
            )?,
        ),
        (
            "timesteps",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![timesteps.len()],
                &timestep_bytes,
            )?,
        ),
    ];
    let bytes = safetensors::tensor::serialize(views, None)?;
    write_atomically(path, |file| file.write_all(&bytes))?;
    Ok(())
}
