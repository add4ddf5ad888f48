//! `attend generate`: one image from a prompt, with its attention maps, trajectory and heat maps on request.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use attend::analysis::edit_spec::{EditSpec, Reweight, SelfReplace};
use attend::analysis::export::{
    a1111_parameters, write_atomically, write_attention_safetensors, write_png_rgb,
    GenerationParameters,
};
use attend::analysis::heatmap::{word_heatmaps, AggregationSettings, Heatmap};
use attend::analysis::png_parameters::{read_png_parameters, PngParameters};
use attend::analysis::prompt_syntax::{parse_prompt, ParsedPrompt};
use attend::analysis::{colormap, WordSpan};
use attend::attention::edit_sampling::{generate_edit, EditObservers, EditRequest};
use attend::attention::prompt_weights::PromptWeights;
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::{AttentionProcessor, CancelToken, ChainedProcessors};
use attend::pipeline::limits::RunCapture;
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{
    generate, prepare_run, prepare_run_with, GenerateOutput, GenerateRequest, StepReport,
};
use attend::pipeline::scheduler::SchedulerKind;

use super::checks::{check_output_file, warn_unknown_words, OutDir};
use super::images::{replay_given_image, ImageArgs};
use super::{load_model, ModelArgs, SamplingArgs};

/// Arguments of `attend generate`. Flag names are stable: scripts rely on them.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The prompt (may be empty: unconditional), in A1111's syntax: `(word:1.3)`, `(word)`,
    /// `[word]`, `\(` for a bracket, and `[from:to:when]` (a Prompt-to-Prompt swap: the image is
    /// the edited prompt's, its attention the source's before the switch).
    #[arg(long, required_unless_present = "from_png")]
    pub prompt: Option<String>,
    /// Reuse the settings of a PNG's `parameters` text (attend's or A1111's): prompt, negative
    /// prompt, steps, sampler, CFG scale, seed and size. `--prompt` and any sampling flag set to a
    /// value other than its default override the PNG's.
    #[arg(long, value_name = "FILE")]
    pub from_png: Option<PathBuf>,
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
    let from_png = args
        .from_png
        .as_deref()
        .map(|path| -> anyhow::Result<PngParameters> {
            read_png_parameters(path)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "--from-png {}: the PNG has no `parameters` text chunk",
                    path.display()
                )
            })
        })
        .transpose()?;
    let prompt = match (&args.prompt, &from_png) {
        (Some(prompt), _) => prompt.clone(),
        (None, Some(png)) => png.prompt.clone(),
        (None, None) => anyhow::bail!("--prompt or --from-png is required"),
    };
    // Syntax errors (with their column) before the model loads.
    let parsed = parse_prompt(&prompt).map_err(|error| anyhow::anyhow!("--prompt: {error}"))?;
    let image_input = args.image.read(&prompt)?;
    let model = load_model(&args.model)?;
    let mut request = args.sampling.request(&model, &prompt)?;
    if let Some(png) = &from_png {
        apply_png_parameters(&mut request, png, &args.sampling, &model)?;
    }
    warn_unknown_words(&model, "--prompt", &parsed.source.text)?;
    if parsed.has_swaps() {
        warn_unknown_words(&model, "--prompt", &parsed.edited.text)?;
    }

    let capture = args.attention_out.is_some() || args.heatmaps_out.is_some();
    let token_count = model
        .tokenizer
        .encode_prompt(&parsed.source.to_syntax())?
        .token_count();
    if capture {
        // The limits with the store's maps of every step, before the run (it checks them without).
        prepare_run_with(&model, &request, &RunCapture::store(token_count, 0))?;
    }
    if let Some(input) = &image_input {
        replay_given_image(&model, input, &mut request, args.quiet)?;
    }
    let started = Instant::now();
    let quiet = args.quiet;
    let mut report_step = |step_index: usize, step_count: usize| {
        if !quiet {
            let elapsed = started.elapsed().as_secs_f64();
            let per_step = elapsed / (step_index + 1) as f64;
            eprint!(
                "\rstep {}/{}  {:.2} s/step  ETA {:.0} s   ",
                step_index + 1,
                step_count,
                per_step,
                per_step * (step_count - step_index - 1) as f64
            );
        }
    };
    let (output, mut store) = if parsed.has_swaps() {
        run_swaps(&model, &request, &parsed, capture, &mut report_step)?
    } else {
        run_plain(&model, &request, capture, token_count, &mut report_step)?
    };
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

/// A plain run: the prompt's weights (if any) scale its cross-attention, the store (when
/// `capture`) records what the UNet used.
fn run_plain(
    model: &StableDiffusion,
    request: &GenerateRequest,
    capture: bool,
    token_count: usize,
    report_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(GenerateOutput, AttentionStore)> {
    let mut store = AttentionStore::new(StoreConfig {
        keep_self: false,
        ..StoreConfig::new(token_count)
    });
    let mut weights = PromptWeights::new(&prepare_run(model, request)?.prompt_tokens.weights);
    let mut processors: Vec<&mut dyn AttentionProcessor> = Vec::new();
    if let Some(weights) = &mut weights {
        processors.push(weights);
    }
    if capture {
        processors.push(&mut store);
    }
    let mut chain = ChainedProcessors::new(processors);
    let mut on_step = |report: &StepReport| {
        report_step(report.step_index, report.step_count);
        Ok(())
    };
    let output = generate(
        model,
        request,
        Some(&mut chain),
        &mut on_step,
        &CancelToken::new(),
    )?;
    drop(chain);
    Ok((output, store))
}

/// A prompt with `[from:to:when]` swaps: a Prompt-to-Prompt edit (batch mode) from the source
/// prompt (every `from`) to the edited prompt (every `to`), whose cross-attention is the source's
/// before each switch ([`ParsedPrompt::edit_windows`]); the edited prompt's weights become the
/// edit's reweights. Returns the edited run (and its attention when `capture`).
fn run_swaps(
    model: &StableDiffusion,
    request: &GenerateRequest,
    parsed: &ParsedPrompt,
    capture: bool,
    report_step: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(GenerateOutput, AttentionStore)> {
    let source_prompt = parsed.source.to_syntax();
    let edit_prompt = parsed.edited.to_syntax();
    let mut source_request = request.clone();
    source_request.prompt.clone_from(&source_prompt);
    let source_run = prepare_run(model, &source_request)?;
    let edit_tokens = model
        .tokenizer
        .encode_prompt_like(&edit_prompt, &source_run.prompt_tokens)?;
    let mut spec = EditSpec::new(edit_prompt.clone());
    if let Some(windows) = parsed.edit_windows(request.steps) {
        spec.cross_window = windows;
    }
    spec.self_replace = SelfReplace::for_edit(
        SelfReplace::recommended(model.edit_defaults()),
        &parsed.source.text,
        &parsed.edited.text,
    );
    spec.reweights = word_reweights(&edit_tokens.words, &edit_tokens.word_weights());
    let mut store = AttentionStore::new(StoreConfig {
        keep_self: false,
        ..StoreConfig::new(edit_tokens.token_count())
    });
    let observers = EditObservers {
        source: None,
        edited: if capture { Some(&mut store) } else { None },
    };
    let mut on_step = |report: &attend::attention::edit_sampling::EditStepReport| {
        report_step(report.step_index, report.step_count);
        Ok(())
    };
    let output = generate_edit(
        model,
        &EditRequest {
            generate: source_request,
            spec,
            replay: false,
        },
        observers,
        &mut on_step,
        &CancelToken::new(),
    )?;
    Ok((output.edited, store))
}

/// One reweight per word whose weight is not 1, naming its occurrence (`word#k`).
fn word_reweights(words: &[WordSpan], weights: &[f32]) -> Vec<Reweight> {
    let mut reweights = Vec::new();
    for (index, (word, &weight)) in words.iter().zip(weights).enumerate() {
        if weight == 1.0 {
            continue;
        }
        let occurrence = words[..index]
            .iter()
            .filter(|other| other.text == word.text)
            .count()
            + 1;
        reweights.push(Reweight {
            word: format!("{}#{occurrence}", word.text),
            scale: weight,
        });
    }
    reweights
}

/// Fills `request` from a PNG's settings where the command line left the default: the prompt and
/// negative prompt, steps, CFG scale, seed, sampler and size. A sampler attend does not implement
/// keeps the model's own (with a warning); a different model name is only a warning.
fn apply_png_parameters(
    request: &mut GenerateRequest,
    png: &PngParameters,
    flags: &super::SamplingArgs,
    model: &StableDiffusion,
) -> anyhow::Result<()> {
    if flags.negative_prompt.is_empty() {
        request.negative_prompt.clone_from(&png.negative_prompt);
    }
    if let (Some(steps), 30) = (png.steps, flags.steps) {
        request.steps = steps;
    }
    if let Some(scale) = png.cfg_scale.filter(|_| flags.guidance == 7.5) {
        request.guidance = scale;
    }
    if let (Some(seed), 0) = (png.seed, flags.seed) {
        request.seed = seed;
    }
    if let Some((width, height)) = png.size_px {
        request.width = flags.width.unwrap_or(width);
        request.height = flags.height.unwrap_or(height);
    }
    if let (Some(sampler), None) = (&png.sampler, &flags.scheduler) {
        match scheduler_of_sampler(sampler) {
            Some(kind) => request.scheduler = Some(kind),
            None => eprintln!(
                "warning: --from-png: attend has no sampler {sampler:?}; using the model's own"
            ),
        }
    }
    if let Some(name) = png.model.as_deref().filter(|name| *name != model.name()) {
        eprintln!(
            "warning: --from-png: the image was made with the model {name:?}, this run uses {:?}",
            model.name()
        );
    }
    Ok(())
}

/// attend's scheduler for an A1111 sampler name (`DPM++ 2M Karras` runs DPM++ 2M with the model's
/// sigmas); `None` for samplers attend does not implement.
fn scheduler_of_sampler(sampler: &str) -> Option<SchedulerKind> {
    let name = sampler.trim().to_lowercase();
    let name = name.strip_suffix(" karras").unwrap_or(&name);
    match name {
        "ddim" => Some(SchedulerKind::Ddim),
        "euler" => Some(SchedulerKind::Euler),
        "euler a" | "euler ancestral" => Some(SchedulerKind::EulerAncestral),
        "dpm++ 2m" => Some(SchedulerKind::DpmPp2m),
        _ => None,
    }
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
