//! `attend eval-shapes`: how well a model draws the scenes of attend's generator, and how well its
//! attention maps find the objects. Seeds 0.. are outside the bundled model's training range
//! (its training scenes use seeds from 1,000,000 on).

use std::time::Instant;

use attend::analysis::heatmap::{word_heatmaps, AggregationSettings};
use attend::analysis::scene_check::{background_colour, find_object, iou, palette_labels};
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::hook::CancelToken;
use attend::pipeline::sampling::{generate, GenerateRequest};
use attend::scenes::{generate_scene, SceneOptions, Shape};

use super::checks::{at_least_one, non_negative, OutDir};
use super::segment::check_guidance;
use super::{load_model, ModelArgs};

/// Arguments of `attend eval-shapes`.
#[derive(Debug, clap::Args)]
pub struct EvalShapesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of scenes.
    #[arg(long, default_value_t = 200, value_parser = non_negative, allow_negative_numbers = true)]
    pub count: u64,
    /// Seed of the first scene (scene i: caption from generator seed start + i, image seed start + i).
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub start: u64,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 20, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Guidance scale (default: the generate default).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    /// Scheduler: ddim, euler, euler-a or dpmpp-2m (default: the model's own).
    #[arg(long)]
    pub scheduler: Option<attend::pipeline::scheduler::SchedulerKind>,
    /// Heat-map threshold (on the min-max normalised DAAM map) for the attention IoU, 0 to 1.
    #[arg(long, default_value_t = 0.4, allow_hyphen_values = true)]
    pub threshold: f32,
    /// Write each generated image here (PNG) for a look.
    #[arg(long)]
    pub images_out: Option<std::path::PathBuf>,
}

/// Run `attend eval-shapes`.
pub fn run(args: &EvalShapesArgs) -> anyhow::Result<()> {
    attend::analysis::segment::check_fraction("threshold", args.threshold)
        .map_err(|error| anyhow::anyhow!("--threshold: {error}"))?;
    check_guidance(args.guidance)?;
    let mut images_out = args
        .images_out
        .as_deref()
        .map(|dir| OutDir::check("--images-out", dir))
        .transpose()?;
    let model = load_model(&args.model)?;
    let images_dir = match &mut images_out {
        Some(dir) => Some(dir.create()?.to_path_buf()),
        None => None,
    };
    let scene_options = SceneOptions::default();
    let (mut scenes_correct, mut objects_total, mut objects_correct, mut backgrounds_correct) =
        (0u64, 0u64, 0u64, 0u64);
    let mut ious = Vec::new();
    let mut seconds = Vec::new();
    for index in 0..args.count {
        let seed = args.start + index;
        let scene = generate_scene(seed, &scene_options);
        let mut request = GenerateRequest::new(&model, scene.caption.clone());
        request.seed = seed;
        request.steps = args.steps;
        if let Some(guidance) = args.guidance {
            request.guidance = guidance;
        }
        if args.scheduler.is_some() {
            request.scheduler = args.scheduler;
        }
        let token_count = model.tokenizer.encode_prompt(&scene.caption)?.token_count();
        let mut store = AttentionStore::new(StoreConfig {
            keep_self: false,
            ..StoreConfig::new(token_count)
        });
        let started = Instant::now();
        let output = generate(
            &model,
            &request,
            Some(&mut store),
            &mut |_| Ok(()),
            &CancelToken::new(),
        )?;
        seconds.push(started.elapsed().as_secs_f64());
        store.finish_step()?;
        let image = &output.image;
        let (width, height) = (image.width, image.height);
        let labels = palette_labels(&image.pixels, width, height);
        if background_colour(&labels, width, height) == Some(scene.background) {
            backgrounds_correct += 1;
        }
        let shape_words: Vec<_> = output
            .prompt_tokens
            .words
            .iter()
            .filter(|word| word.text.parse::<Shape>().is_ok())
            .cloned()
            .collect();
        let heatmaps = word_heatmaps(
            store.steps(),
            &shape_words,
            &AggregationSettings::default(),
            height,
            width,
        );
        let mut all_right = true;
        let mut verdicts = Vec::new();
        for (object_index, object) in scene.objects.iter().enumerate() {
            objects_total += 1;
            let region = find_object(&labels, width, height, object.colour);
            let right = region
                .as_ref()
                .is_some_and(|region| region.shape == object.shape);
            if right {
                objects_correct += 1;
            } else {
                all_right = false;
            }
            if let (Some(region), Some(heatmap)) = (&region, heatmaps.get(object_index)) {
                let attended: Vec<bool> = heatmap
                    .data
                    .iter()
                    .map(|&value| value >= args.threshold)
                    .collect();
                ious.push(iou(&attended, &region.mask));
            }
            verdicts.push(format!(
                "{} {}: {}",
                object.colour,
                object.shape,
                region.map_or_else(
                    || "missing".to_string(),
                    |r| format!("{} ({} px)", r.shape, r.area)
                )
            ));
        }
        if all_right {
            scenes_correct += 1;
        }
        if let Some(dir) = &images_dir {
            let name = format!("{seed:04}_{}.png", if all_right { "ok" } else { "wrong" });
            attend::analysis::export::write_png_rgb(
                &dir.join(name),
                width,
                height,
                &image.pixels,
                Some(&scene.caption),
            )?;
        }
        let done = (index + 1) as f64;
        let running_iou = if ious.is_empty() {
            0.0
        } else {
            ious.iter().sum::<f32>() / ious.len() as f32
        };
        eprintln!(
            "[{}/{}] seed {seed} \"{}\" -> {} | so far: scenes right {:.1}%, objects right {:.1}%, mean IoU {running_iou:.3}",
            index + 1,
            args.count,
            scene.caption,
            verdicts.join("; "),
            100.0 * scenes_correct as f64 / done,
            100.0 * objects_correct as f64 / objects_total.max(1) as f64,
        );
    }
    seconds.sort_by(f64::total_cmp);
    let median_secs = seconds.get(seconds.len() / 2).copied().unwrap_or(0.0);
    let count = args.count.max(1) as f64;
    let mean_iou = if ious.is_empty() {
        0.0
    } else {
        ious.iter().sum::<f32>() / ious.len() as f32
    };
    println!(
        "scenes: {} (seeds {}..{}), {} steps, guidance {}",
        args.count,
        args.start,
        args.start + args.count,
        args.steps,
        args.guidance
            .map_or_else(|| "default".to_string(), |g| g.to_string())
    );
    println!(
        "object accuracy (scene: every named shape present in its colour): {:.1}%",
        100.0 * scenes_correct as f64 / count
    );
    println!(
        "object accuracy (per object): {:.1}% of {objects_total}",
        100.0 * objects_correct as f64 / objects_total.max(1) as f64
    );
    println!(
        "background colour right: {:.1}%",
        100.0 * backgrounds_correct as f64 / count
    );
    println!(
        "attention IoU (shape word map >= {} vs object region): mean {mean_iou:.3} over {} objects",
        args.threshold,
        ious.len()
    );
    println!(
        "seconds per {}-step generation (median): {median_secs:.2}",
        args.steps
    );
    println!(
        "{}",
        serde_json::json!({
            "scene_accuracy": scenes_correct as f64 / count,
            "object_accuracy": objects_correct as f64 / objects_total.max(1) as f64,
            "background_accuracy": backgrounds_correct as f64 / count,
            "mean_attention_iou": mean_iou,
            "median_generation_secs": median_secs,
        })
    );
    if let Some(dir) = images_out {
        dir.keep();
    }
    Ok(())
}
