//! `attend style-eval`: measures Style Aligned on the bundled model. Each set has a reference
//! prompt that names a background colour (`a red circle on a blue background`) and target prompts
//! that name none (`a green square`); the bundled model draws an unnamed background white, so a
//! target that comes out on the reference's background took it from the reference. Per target:
//! does it take the reference's background, and does it still draw its own object (its colour's
//! largest region has its shape, as `attend eval-shapes` judges)? The same sets generated
//! independently (same seeds, no sharing) are the baseline. Optionally also the UNet time of a
//! set on a UNet config with random weights (SD 1.5's manifest).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::analysis::scene_check::{background_colour, find_object, palette_labels};
use attend::attention::style_aligned::{StyleAligned, StyleAlignedConfig};
use attend::attention::style_sampling::{generate_style_set, StyleSetOutput, StyleSetRequest};
use attend::hook::{AttentionHook, AttentionProcessor, CancelToken};
use attend::pipeline::limits::{estimate_style_set_memory, ModelFootprint, RunCapture};
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::rng::NoiseRng;
use attend::pipeline::sampling::{GenerateRequest, RgbImage};
use attend::pipeline::unet::config::UnetConfig;
use attend::pipeline::unet::Unet;
use attend::pipeline::weights::RandomWeights;
use attend::scenes::{Colour, SceneRng, Shape};
use candle_core::{DType, Device};

use super::checks::{at_least_one, non_negative, OutDir};
use super::segment::check_guidance;
use super::style_aligned::{image_row, StyleFlags};
use super::{load_model, ModelArgs};

/// Arguments of `attend style-eval`.
#[derive(Debug, clap::Args)]
pub struct StyleEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of sets.
    #[arg(long, default_value_t = 8, value_parser = non_negative, allow_negative_numbers = true)]
    pub sets: u64,
    /// Seed of the first set (set i: prompts drawn from seed start + i, generation seed start + i).
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub start: u64,
    /// Target prompts per set (besides the reference).
    #[arg(long, default_value_t = 3, value_parser = at_least_one, allow_negative_numbers = true)]
    pub targets: usize,
    /// Denoising steps per set.
    #[arg(long, default_value_t = 20, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Guidance scale (default: the generate default).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    #[command(flatten)]
    pub style: StyleFlags,
    /// Skip the independent baseline (only the shared sets run; also the random-weights timing's).
    #[arg(long)]
    pub no_baseline: bool,
    /// Write each set's grids (`<seed>_shared.png`, `<seed>_independent.png`) here.
    #[arg(long)]
    pub images_out: Option<PathBuf>,
    /// Write the JSON summary to this file too (it is always printed).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Also time the UNet calls of a set on this UNet config (or shape manifest with
    /// `configs.unet`, e.g. tests/fixtures/manifests/sd15.json) with random weights (the sets
    /// themselves still run on the model; `--random-weights` would replace the model itself).
    #[arg(
        long = "time-random-unet",
        value_name = "MANIFEST",
        alias = "random-config"
    )]
    pub time_random_unet: Option<PathBuf>,
    /// Image side in pixels of the random-weights timing (latent side = side / 8).
    #[arg(long, default_value_t = 256, value_parser = at_least_one, allow_negative_numbers = true)]
    pub random_side: usize,
    /// Timed UNet calls per variant of the random-weights timing (after one warm-up call).
    #[arg(long, default_value_t = 2, value_parser = at_least_one, allow_negative_numbers = true)]
    pub random_calls: usize,
    /// Only print the random-weights set's memory estimate (no UNet is built or run).
    #[arg(long)]
    pub random_estimate_only: bool,
    /// No warm-up call before the timed random-weights calls (e.g. to measure the peak memory of
    /// one call with `/usr/bin/time -v`; with --no-baseline only the shared call runs).
    #[arg(long)]
    pub random_no_warmup: bool,
}

/// Colours an object may have (white is the unnamed background).
const OBJECT_COLOURS: [Colour; 7] = [
    Colour::Red,
    Colour::Green,
    Colour::Blue,
    Colour::Yellow,
    Colour::Purple,
    Colour::Orange,
    Colour::Black,
];

/// One named object of a prompt.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct NamedObject {
    colour: Colour,
    shape: Shape,
}

impl NamedObject {
    fn phrase(self) -> String {
        format!("{} {} {}", self.colour.article(), self.colour, self.shape)
    }
}

/// A set's prompts: the reference (object + background) and the targets (objects only).
#[derive(Clone, Debug, serde::Serialize)]
struct SetPlan {
    seed: u64,
    background: Colour,
    reference: NamedObject,
    targets: Vec<NamedObject>,
}

impl SetPlan {
    /// Drawn from `seed`: a background other than white, objects in other colours.
    fn new(seed: u64, targets: usize) -> Self {
        let mut rng = SceneRng::new(seed ^ 0x0053_5459_4c45);
        let background = OBJECT_COLOURS[rng.below(OBJECT_COLOURS.len())];
        let object = |rng: &mut SceneRng| {
            let colours: Vec<Colour> = OBJECT_COLOURS
                .iter()
                .copied()
                .filter(|&colour| colour != background)
                .collect();
            NamedObject {
                colour: colours[rng.below(colours.len())],
                shape: Shape::ALL[rng.below(Shape::ALL.len())],
            }
        };
        let reference = object(&mut rng);
        let targets = (0..targets).map(|_| object(&mut rng)).collect();
        Self {
            seed,
            background,
            reference,
            targets,
        }
    }

    fn reference_prompt(&self) -> String {
        format!(
            "{} on {} {} background",
            self.reference.phrase(),
            self.background.article(),
            self.background
        )
    }
}

/// What one image shows.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct Verdict {
    background_taken: bool,
    object_drawn: bool,
}

fn judge(image: &RgbImage, background: Colour, object: NamedObject) -> Verdict {
    let labels = palette_labels(&image.pixels, image.width, image.height);
    Verdict {
        background_taken: background_colour(&labels, image.width, image.height) == Some(background),
        object_drawn: find_object(&labels, image.width, image.height, object.colour)
            .is_some_and(|region| region.shape == object.shape),
    }
}

/// Shares over every target of the sets run.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct Tally {
    targets: u64,
    background_taken: u64,
    object_drawn: u64,
    both: u64,
    references_with_background: u64,
    set_seconds: Vec<f64>,
}

impl Tally {
    fn add(&mut self, plan: &SetPlan, output: &StyleSetOutput, seconds: f64) -> Vec<Verdict> {
        self.set_seconds.push(seconds);
        if judge(&output.reference.image, plan.background, plan.reference).background_taken {
            self.references_with_background += 1;
        }
        let mut verdicts = Vec::new();
        for (target, object) in output.targets.iter().zip(&plan.targets) {
            let verdict = judge(&target.image, plan.background, *object);
            self.targets += 1;
            self.background_taken += u64::from(verdict.background_taken);
            self.object_drawn += u64::from(verdict.object_drawn);
            self.both += u64::from(verdict.background_taken && verdict.object_drawn);
            verdicts.push(verdict);
        }
        verdicts
    }

    fn summary(&self, sets: u64) -> serde_json::Value {
        let share = |count: u64| count as f64 / self.targets.max(1) as f64;
        let mut seconds = self.set_seconds.clone();
        seconds.sort_by(f64::total_cmp);
        serde_json::json!({
            "targets": self.targets,
            "background_taken": share(self.background_taken),
            "object_drawn": share(self.object_drawn),
            "both": share(self.both),
            "reference_background_right": self.references_with_background as f64 / sets.max(1) as f64,
            "median_seconds_per_set": seconds.get(seconds.len() / 2).copied().unwrap_or(0.0),
        })
    }
}

/// Run `attend style-eval`.
pub fn run(args: &StyleEvalArgs) -> anyhow::Result<()> {
    check_guidance(args.guidance)?;
    let config = args.style.config(false)?;
    let mut images_out = args
        .images_out
        .as_deref()
        .map(|dir| OutDir::check("--images-out", dir))
        .transpose()?;
    if let Some(path) = &args.json_out {
        super::checks::check_output_file("--json-out", path)?;
    }
    let model = load_model(&args.model)?;
    let images_dir = match &mut images_out {
        Some(dir) => Some(dir.create()?.to_path_buf()),
        None => None,
    };
    let mut shared = Tally::default();
    let mut independent = Tally::default();
    let mut per_set = Vec::new();
    for index in 0..args.sets {
        let plan = SetPlan::new(args.start + index, args.targets);
        let mut generate = GenerateRequest::new(&model, plan.reference_prompt());
        generate.seed = plan.seed;
        generate.steps = args.steps;
        if let Some(guidance) = args.guidance {
            generate.guidance = guidance;
        }
        let request = StyleSetRequest {
            generate,
            target_prompts: plan.targets.iter().map(|object| object.phrase()).collect(),
            sharing: Some(config),
            reference_image: None,
        };
        let (output, seconds) = run_set(&model, &request)?;
        let shared_verdicts = shared.add(&plan, &output, seconds);
        write_grid(images_dir.as_deref(), &plan, "shared", &output)?;
        let independent_verdicts = if args.no_baseline {
            Vec::new()
        } else {
            let baseline = StyleSetRequest {
                sharing: None,
                ..request.clone()
            };
            let (output, seconds) = run_set(&model, &baseline)?;
            write_grid(images_dir.as_deref(), &plan, "independent", &output)?;
            independent.add(&plan, &output, seconds)
        };
        eprintln!(
            "[{}/{}] seed {} \"{}\" + {:?}: shared {} | independent {} | {:.1} s",
            index + 1,
            args.sets,
            plan.seed,
            plan.reference_prompt(),
            request.target_prompts,
            verdict_text(&shared_verdicts),
            verdict_text(&independent_verdicts),
            seconds
        );
        per_set.push(serde_json::json!({
            "plan": plan,
            "reference_prompt": plan.reference_prompt(),
            "target_prompts": request.target_prompts,
            "shared": shared_verdicts,
            "independent": independent_verdicts,
        }));
    }
    let random_timing = match &args.time_random_unet {
        Some(path) => Some(time_random_unet(args, &model, path, config)?),
        None => None,
    };
    let summary = serde_json::json!({
        "model": model.dir().display().to_string(),
        "sets": args.sets,
        "seeds": [args.start, args.start + args.sets],
        "targets_per_set": args.targets,
        "steps": args.steps,
        "guidance": args.guidance,
        "config": config,
        "shared": shared.summary(args.sets),
        "independent": (!args.no_baseline).then(|| independent.summary(args.sets)),
        "random_weights_timing": random_timing,
        "per_set": per_set,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(path) = &args.json_out {
        write_atomically(path, |file| file.write_all(text.as_bytes()))?;
    }
    if let Some(dir) = images_out {
        dir.keep();
    }
    Ok(())
}

fn verdict_text(verdicts: &[Verdict]) -> String {
    verdicts
        .iter()
        .map(|verdict| {
            format!(
                "{}{}",
                if verdict.background_taken { "B" } else { "-" },
                if verdict.object_drawn { "O" } else { "-" }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_set(
    model: &StableDiffusion,
    request: &StyleSetRequest,
) -> anyhow::Result<(StyleSetOutput, f64)> {
    let started = Instant::now();
    let output = generate_style_set(
        model,
        request,
        &RunCapture::none(),
        None,
        &mut |_| Ok(()),
        &CancelToken::new(),
    )?;
    Ok((output, started.elapsed().as_secs_f64()))
}

fn write_grid(
    dir: Option<&std::path::Path>,
    plan: &SetPlan,
    kind: &str,
    output: &StyleSetOutput,
) -> anyhow::Result<()> {
    let Some(dir) = dir else {
        return Ok(());
    };
    let images: Vec<&RgbImage> = std::iter::once(&output.reference.image)
        .chain(output.targets.iter().map(|target| &target.image))
        .collect();
    let grid = image_row(&images)?;
    write_png_rgb(
        &dir.join(format!("{:04}_{kind}.png", plan.seed)),
        grid.width,
        grid.height,
        &grid.pixels,
        Some(&plan.reference_prompt()),
    )?;
    Ok(())
}

/// Median seconds of one UNet call of a set (reference + targets, CFG batch) with random weights,
/// with sharing and without, and the set's UNet seconds at `args.steps` steps.
fn time_random_unet(
    args: &StyleEvalArgs,
    model: &StableDiffusion,
    path: &std::path::Path,
    config: StyleAlignedConfig,
) -> anyhow::Result<serde_json::Value> {
    let device = Device::Cpu;
    let unet_json = super::manifest_component_json(path, "unet").context("--time-random-unet")?;
    let unet_config = UnetConfig::from_json(&unet_json, path)?;
    let images = 1 + args.targets;
    let batch = 2 * images;
    // The memory the set's run would be estimated to need (weights aside), SD-like latents.
    let mut sized = GenerateRequest::new(model, "");
    sized.width = args.random_side;
    sized.height = args.random_side;
    sized.steps = args.steps;
    let estimate = estimate_style_set_memory(
        &ModelFootprint::unet_only(&unet_config, 8, 77, DType::F32, true),
        &sized,
        images,
        &RunCapture::none(),
        false,
    );
    if args.random_estimate_only {
        return Ok(serde_json::json!({
            "config": path.display().to_string(),
            "side_px": args.random_side,
            "images": images,
            "unet_batch": batch,
            "estimated_run_bytes_without_weights": estimate.total_bytes(),
        }));
    }
    let vb = RandomWeights::new(0).var_builder(DType::F32, &device);
    let unet = Unet::new(vb, &unet_config)?;
    let latent_side = args.random_side / 8;
    anyhow::ensure!(
        latent_side >= 8 && args.random_side.is_multiple_of(64),
        "--random-side {} must be a multiple of 64",
        args.random_side
    );
    let mut rng = NoiseRng::new(3);
    let sample = rng.randn(
        vec![batch, unet_config.in_channels, latent_side, latent_side],
        &device,
    )?;
    let text_width = unet_config
        .cross_attention_dim
        .resolve(1)
        .and_then(|dims| dims.first().copied())
        .context("per-block cross_attention_dim is not supported by the timing")?;
    let context = rng.randn(vec![batch, 77, text_width], &device)?;
    let mut processor = StyleAligned::new(config, &unet_config)?;
    let mut time_calls = |sharing: bool| -> anyhow::Result<f64> {
        let mut seconds = Vec::new();
        let first_timed = usize::from(!args.random_no_warmup);
        for call in 0..args.random_calls + first_timed {
            let started = Instant::now();
            let mut hook = sharing.then_some(AttentionHook {
                processor: &mut processor as &mut dyn AttentionProcessor,
                step_index: 0,
                step_count: 1,
                cfg: true,
                cancel: None,
            });
            let output = unet.forward(&sample, 500.0, &context, hook.as_mut())?;
            let _ = output.dims();
            if call >= first_timed {
                seconds.push(started.elapsed().as_secs_f64());
            }
            eprintln!(
                "random-weights UNet call (batch {batch}, sharing {sharing}): {:.2} s",
                started.elapsed().as_secs_f64()
            );
        }
        seconds.sort_by(f64::total_cmp);
        Ok(seconds[seconds.len() / 2])
    };
    let shared_call = time_calls(true)?;
    let independent_call = if args.no_baseline {
        None
    } else {
        Some(time_calls(false)?)
    };
    Ok(serde_json::json!({
        "config": path.display().to_string(),
        "side_px": args.random_side,
        "images": images,
        "unet_batch": batch,
        "estimated_run_bytes_without_weights": estimate.total_bytes(),
        "median_unet_call_secs_shared": shared_call,
        "median_unet_call_secs_independent": independent_call,
        "unet_secs_per_set_shared": shared_call * args.steps as f64,
        "unet_secs_per_set_independent": independent_call.map(|call| call * args.steps as f64),
        "steps": args.steps,
    }))
}
