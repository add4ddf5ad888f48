//! `attend edit-eval`: Prompt-to-Prompt measured on drawn scenes of attend's generator. Per seed,
//! a word swap and reweights of one object are judged by finding the scene's objects by colour
//! in the source and the edited images; the rates over all seeds are printed (and written as JSON).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::edit_spec::{CrossWindow, EditSpec, LocalBlendConfig, Reweight, SelfReplace};
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::analysis::scene_check::{find_object, palette_labels};
use attend::attention::edit_sampling::{generate_edited_branch, record_source};
use attend::attention::p2p::{RecordConfig, INVERTED_IMAGE_SWAP};
use attend::hook::CancelToken;
use attend::pipeline::sampling::{generate, GenerateRequest, RgbImage};
use attend::scenes::{generate_scene, Colour, Scene, SceneObject, SceneOptions, Shape};

use super::checks::{at_least_one, check_output_file, non_negative, OutDir};
use super::edit::{
    check_blend_threshold, parse_window, self_replace_from_args, MAX_REWEIGHT_SCALE,
};
use super::{load_model, ModelArgs};

/// Arguments of `attend edit-eval`: Prompt-to-Prompt measured on drawn scenes of attend's generator.
///
/// Per seed: the scene's caption is generated (image seed = scene seed); the source is recorded once
/// and replayed into each edit. Object `seed % objects` is the target.
/// - **Swap**: its shape word becomes the next shape (circle -> square -> triangle -> star -> circle).
///   Success: the target's colour is still found with its centroid within the tolerance, and every
///   other object found in the source is found again with its centroid within the tolerance and the
///   same shape verdict. Also reported: the same judged by the target's bounding-box centre, which
///   a shape change does not move (a triangle's centroid sits lower in its box than a square's).
/// - **Reweight**: the target's words (colour and shape by default) scaled by each
///   `--reweight-scales` value with the prompt unchanged. Removed: the target's colour is no longer
///   found; weakened: removed or its area at most half the source's. Skipped when a word occurs twice
///   in the caption.
///
/// Objects are found by colour (nearest palette entry, largest connected region) as in
/// `attend eval-shapes`. Seeds where the source image lacks the target are counted and skipped.
#[derive(Debug, clap::Args)]
pub struct EditEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of seeds.
    #[arg(long, default_value_t = 100, value_parser = non_negative, allow_negative_numbers = true)]
    pub count: u64,
    /// First seed.
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub start: u64,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 20, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Guidance scale (default: the generate default).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    /// Cross-attention replacement window of the swap (F or START:END).
    #[arg(long, default_value = "0.8", allow_negative_numbers = true)]
    pub cross_replace: String,
    /// Self-attention replacement window (F or START:END), for swaps and reweights. Default: for
    /// swaps the model's recommendation (0.2 for the bundled model), else the reference's 0.4, and
    /// none with `--real-images` (local blend holds the rest of the image); for reweights (the
    /// prompt unchanged) the reference's 0.4.
    #[arg(long, value_name = "F|START:END", allow_negative_numbers = true)]
    pub self_replace: Option<String>,
    /// Self-attention is replaced only in layers whose query grid side is at most this. Default: for
    /// swaps the model's recommendation (32 for the bundled model), else the reference's 16; for
    /// reweights 16.
    #[arg(long, value_name = "SIDE", value_parser = at_least_one, allow_negative_numbers = true)]
    pub self_replace_max_side: Option<usize>,
    /// Local blend for the swap, as Prompt-to-Prompt's word-swap examples use it: only the region of
    /// the target object's colour word and of its old and new shape words may change (each named by
    /// its occurrence, `square#2`, so another object of the same shape stays closed). On by default
    /// with `--real-images`.
    #[arg(long)]
    pub local_blend: bool,
    /// With `--real-images`, where the swap blends locally by default: edit without local blend.
    #[arg(long, conflicts_with = "local_blend", requires = "real_images")]
    pub no_local_blend: bool,
    /// Local blend: the blend acts from this fraction of the steps on (default: 0.2, the
    /// reference's).
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    pub blend_start: Option<f64>,
    /// With `--real-images`: scale the edited caption's attention to the new shape word by this
    /// (Prompt-to-Prompt's reweight on top of the swap; 1: none). Default: the inverted-image
    /// setting's swapped-word weight.
    #[arg(long, value_name = "F", requires = "real_images")]
    pub swap_weight: Option<f32>,
    /// Local blend threshold on the max-normalised word map (with `--local-blend`).
    #[arg(long, default_value_t = 0.3, allow_hyphen_values = true)]
    pub blend_threshold: f32,
    /// Reweight scales to measure, comma-separated (empty: none).
    #[arg(long, default_value = "0,-1", allow_hyphen_values = true)]
    pub reweight_scales: String,
    /// Which words of the target to reweight: shape, colour or both.
    #[arg(long, default_value = "both")]
    pub reweight_word: String,
    /// Centroid tolerance in pixels at 64 px (scaled to the image size).
    #[arg(long, default_value_t = 4.0, allow_hyphen_values = true)]
    pub centroid_tolerance_px: f32,
    /// Also generate each swapped caption without Prompt-to-Prompt (same seed), for comparison.
    #[arg(long)]
    pub baseline: bool,
    /// Measure only the reweights (no swap).
    #[arg(long)]
    pub skip_swap: bool,
    /// Write per-seed results and the summary as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Write source / swapped / reweighted images here.
    #[arg(long)]
    pub images_out: Option<PathBuf>,
    /// Edit the drawn scenes themselves as given images: each scene is inverted with its caption
    /// (per `--inversion-methods`), its reconstruction measured (PSNR), and the word swap judged
    /// against the drawn scene. Measures swaps only (no reweights, no baseline).
    #[arg(long, conflicts_with_all = ["baseline", "skip_swap"])]
    pub real_images: bool,
    /// With `--real-images`: the inversion methods to compare, comma-separated (default: direct).
    #[arg(long, value_name = "METHOD[,METHOD]", requires = "real_images")]
    pub inversion_methods: Option<String>,
}

/// Whether a swap on an inverted scene blends locally: by default yes (see
/// [`attend::attention::p2p::INVERTED_IMAGE_SWAP`]), `--no-local-blend` says no.
pub(super) fn real_image_local_blend(args: &EditEvalArgs) -> bool {
    args.local_blend || (INVERTED_IMAGE_SWAP.local_blend && !args.no_local_blend)
}

/// What was measured for one object of a scene in a generated image.
#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct FoundObject {
    colour: Colour,
    pub(super) found: bool,
    centroid_px: Option<(f32, f32)>,
    /// Centre of the bounding box (does not move when a shape changes into another of the same box).
    box_centre_px: Option<(f32, f32)>,
    area: usize,
    shape: Option<Shape>,
}

pub(super) fn measure_objects(image: &RgbImage, scene: &Scene) -> Vec<FoundObject> {
    let labels = palette_labels(&image.pixels, image.width, image.height);
    scene
        .objects
        .iter()
        .map(|object| {
            let region = find_object(&labels, image.width, image.height, object.colour);
            FoundObject {
                colour: object.colour,
                found: region.is_some(),
                centroid_px: region.as_ref().map(|region| region.centroid_px),
                box_centre_px: region
                    .as_ref()
                    .and_then(|region| box_centre(&region.mask, image.width)),
                area: region.as_ref().map_or(0, |region| region.area),
                shape: region.as_ref().map(|region| region.shape),
            }
        })
        .collect()
}

/// Centre of the bounding box of a `[h, w]` mask with `width` columns.
fn box_centre(mask: &[bool], width: usize) -> Option<(f32, f32)> {
    let mut bounds: Option<(usize, usize, usize, usize)> = None;
    for (index, _) in mask.iter().enumerate().filter(|(_, &inside)| inside) {
        let (x, y) = (index % width, index / width);
        bounds = Some(match bounds {
            None => (x, y, x, y),
            Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
        });
    }
    let (x0, y0, x1, y1) = bounds?;
    Some(((x0 + x1) as f32 / 2.0 + 0.5, (y0 + y1) as f32 / 2.0 + 0.5))
}

/// One seed's results.
#[derive(Clone, Debug, Default, serde::Serialize)]
struct SeedResult {
    seed: u64,
    caption: String,
    target: usize,
    source_has_target: bool,
    swap_caption: String,
    swap: Option<SwapVerdict>,
    baseline: Option<SwapVerdict>,
    reweights: Vec<ReweightVerdict>,
    seconds: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub(super) struct SwapVerdict {
    pub(super) target_kept: bool,
    pub(super) target_shift_px: Option<f32>,
    /// Shift of the target's bounding-box centre (at 64 px).
    pub(super) target_box_shift_px: Option<f32>,
    /// Success judged by the bounding-box centre instead of the centroid.
    pub(super) success_by_box: bool,
    /// Success, and the target now has the new shape (the edit took).
    pub(super) success_with_new_shape: bool,
    pub(super) new_shape_drawn: bool,
    pub(super) others_unchanged: bool,
    pub(super) success: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
struct ReweightVerdict {
    scale: f32,
    word: String,
    removed: bool,
    weakened: bool,
    area_ratio: f32,
    others_unchanged: bool,
}

/// Centroid distance scaled to a 64 px image.
fn shift_at_64(a: (f32, f32), b: (f32, f32), width: usize) -> f32 {
    let scale = 64.0 / width.max(1) as f32;
    ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() * scale
}

fn others_unchanged(
    source: &[FoundObject],
    edited: &[FoundObject],
    target: usize,
    width: usize,
    tolerance: f32,
) -> bool {
    source
        .iter()
        .zip(edited)
        .enumerate()
        .filter(|&(index, (before, _))| index != target && before.found)
        .all(
            |(_, (before, after))| match (before.centroid_px, after.centroid_px) {
                (Some(a), Some(b)) => {
                    shift_at_64(a, b, width) <= tolerance && before.shape == after.shape
                }
                _ => false,
            },
        )
}

pub(super) fn judge_swap(
    source: &[FoundObject],
    edited: &[FoundObject],
    target: usize,
    new_shape: Shape,
    width: usize,
    tolerance: f32,
) -> SwapVerdict {
    let shift = match (source[target].centroid_px, edited[target].centroid_px) {
        (Some(a), Some(b)) => Some(shift_at_64(a, b, width)),
        _ => None,
    };
    let target_kept = shift.is_some_and(|shift| shift <= tolerance);
    let box_shift = match (source[target].box_centre_px, edited[target].box_centre_px) {
        (Some(a), Some(b)) => Some(shift_at_64(a, b, width)),
        _ => None,
    };
    let others = others_unchanged(source, edited, target, width, tolerance);
    SwapVerdict {
        target_kept,
        target_shift_px: shift,
        target_box_shift_px: box_shift,
        success_by_box: others && box_shift.is_some_and(|shift| shift <= tolerance),
        success_with_new_shape: target_kept && others && edited[target].shape == Some(new_shape),
        new_shape_drawn: edited[target].shape == Some(new_shape),
        others_unchanged: others,
        success: target_kept && others,
    }
}

/// The caption with the `target`-th shape word replaced.
pub(super) fn swap_shape_word(caption: &str, target: usize, new_shape: Shape) -> String {
    let mut shape_index = 0usize;
    caption
        .split(' ')
        .map(|word| {
            if word.parse::<Shape>().is_ok() {
                shape_index += 1;
                if shape_index - 1 == target {
                    return new_shape.word();
                }
            }
            word
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Local-blend words of a swap of `objects[target]`'s shape to `new_shape`: the target's colour
/// word, its shape word in the source caption and `new_shape` in the swapped caption, each as
/// `word#k` (its occurrence among the objects, which the caption names first and in order).
pub(super) fn swap_blend_words(
    objects: &[SceneObject],
    target: usize,
    new_shape: Shape,
) -> Vec<String> {
    let before = &objects[..target.min(objects.len())];
    let Some(object) = objects.get(target) else {
        return Vec::new();
    };
    let colour_k = 1 + before.iter().filter(|o| o.colour == object.colour).count();
    let shape_k = 1 + before.iter().filter(|o| o.shape == object.shape).count();
    let new_k = 1 + before.iter().filter(|o| o.shape == new_shape).count();
    // The colour word is the same object in both captions; the old shape is looked up in the
    // source alone and the new one in the swapped caption alone, where an occurrence number could
    // name another object.
    vec![
        format!("{}#{colour_k}", object.colour.word()),
        format!("source:{}#{shape_k}", object.shape.word()),
        format!("edit:{}#{new_k}", new_shape.word()),
    ]
}

pub(super) fn next_shape(shape: Shape) -> Shape {
    let index = Shape::ALL.iter().position(|&s| s == shape).unwrap_or(0);
    Shape::ALL[(index + 1) % Shape::ALL.len()]
}

/// Run `attend edit-eval`.
pub fn run(args: &EditEvalArgs) -> anyhow::Result<()> {
    let inversion_methods =
        super::invert_eval::methods_flag("--inversion-methods", args.inversion_methods.as_deref())?;
    let cross = parse_window(&args.cross_replace).context("--cross-replace")?;
    self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        SelfReplace::default(),
    )?;
    let scales: Vec<f32> = args
        .reweight_scales
        .split(',')
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .map(|text| {
            let scale = text
                .parse::<f32>()
                .with_context(|| format!("--reweight-scales: {text:?} is not a number"))?;
            anyhow::ensure!(
                scale.is_finite() && scale.abs() <= MAX_REWEIGHT_SCALE,
                "--reweight-scales: {scale} is outside the accepted range \
                 -{MAX_REWEIGHT_SCALE} to {MAX_REWEIGHT_SCALE}"
            );
            Ok(scale)
        })
        .collect::<anyhow::Result<_>>()?;
    check_blend_threshold(args.blend_threshold)?;
    let (reweight_shape, reweight_colour) = match args.reweight_word.as_str() {
        "shape" => (true, false),
        "colour" | "color" => (false, true),
        "both" => (true, true),
        other => anyhow::bail!("--reweight-word {other:?}: expected shape, colour or both"),
    };
    let mut images_out = args
        .images_out
        .as_deref()
        .map(|dir| OutDir::check("--images-out", dir))
        .transpose()?;
    if let Some(path) = &args.json_out {
        check_output_file("--json-out", path)?;
    }
    let model = load_model(&args.model)?;
    // Swaps change a word and take the model's recommendation; reweights keep the source prompt
    // and take the reference's setting (`SelfReplace::for_edit`), unless the flags say.
    // On inverted scenes the window starts from the inverted-image setting.
    let recommended = SelfReplace::recommended(model.edit_defaults());
    let self_replace = self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        if args.real_images {
            INVERTED_IMAGE_SWAP.self_replace(recommended)
        } else {
            recommended
        },
    )?;
    let reweight_self_replace = self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        SelfReplace::default(),
    )?;
    // Real images measure swaps only.
    let measured = if args.real_images { 1 } else { 2 };
    for (what, setting) in [
        ("swaps", self_replace),
        ("reweights", reweight_self_replace),
    ]
    .into_iter()
    .take(measured)
    {
        eprintln!(
            "{what}: self-attention replaced in layers up to {side}x{side} for steps {:.2}..{:.2} of the run",
            setting.window.start,
            setting.window.end,
            side = setting.max_queries.isqrt()
        );
    }
    let (width, _) = model.default_size_px();
    let scene_options = SceneOptions {
        size_px: width,
        ..SceneOptions::default()
    };
    if args.real_images {
        return super::invert_eval::run_real_image_edits(
            args,
            &model,
            &inversion_methods,
            cross,
            self_replace,
            images_out,
        );
    }
    let cancel = CancelToken::new();
    if let Some(dir) = &mut images_out {
        dir.create()?;
    }
    let mut results = Vec::new();
    for seed in args.start..args.start + args.count {
        let started = Instant::now();
        let scene = generate_scene(seed, &scene_options);
        let target = (seed % scene.objects.len() as u64) as usize;
        let target_object = &scene.objects[target];
        let new_shape = next_shape(target_object.shape);
        let mut result = SeedResult {
            seed,
            caption: scene.caption.clone(),
            target,
            swap_caption: swap_shape_word(&scene.caption, target, new_shape),
            ..SeedResult::default()
        };
        let mut request = GenerateRequest::new(&model, scene.caption.clone());
        request.seed = seed;
        request.steps = args.steps;
        if let Some(guidance) = args.guidance {
            request.guidance = guidance;
        }
        let (source, recording) = record_source(
            &model,
            &request,
            RecordConfig {
                self_max_queries: self_replace
                    .max_queries
                    .max(reweight_self_replace.max_queries),
                batch_item: 0,
            },
            None,
            &mut |_| Ok(()),
            &cancel,
        )?;
        let source_objects = measure_objects(&source.image, &scene);
        result.source_has_target = source_objects[target].found;
        let save = |name: String, image: &RgbImage| -> anyhow::Result<()> {
            if let Some(dir) = &args.images_out {
                write_png_rgb(
                    &dir.join(name),
                    image.width,
                    image.height,
                    &image.pixels,
                    None,
                )?;
            }
            Ok(())
        };
        save(format!("{seed:04}_source.png"), &source.image)?;
        // The edited prompt's image, replaying the recorded source.
        let edited_image = |spec: &EditSpec| -> anyhow::Result<RgbImage> {
            let branch = generate_edited_branch(
                &model,
                &request,
                spec,
                Arc::clone(&recording),
                None,
                &mut |_| Ok(()),
                &cancel,
            )?;
            Ok(branch.edited.image)
        };
        if result.source_has_target {
            if !args.skip_swap {
                // The target's colour word and its old and new shape words, each named by its
                // occurrence ("square#2"), so a shape that another object shares does not open
                // that object's region too. Objects come first in the caption, in order.
                let blend_words = swap_blend_words(&scene.objects, target, new_shape);
                let local_blend = args.local_blend.then(|| LocalBlendConfig {
                    words: blend_words,
                    threshold: args.blend_threshold,
                    start_fraction: args
                        .blend_start
                        .unwrap_or(LocalBlendConfig::default().start_fraction),
                    ..LocalBlendConfig::default()
                });
                let spec = EditSpec {
                    cross_window: CrossWindow::uniform(cross),
                    self_replace,
                    local_blend,
                    ..EditSpec::new(result.swap_caption.clone())
                };
                let swapped_image = edited_image(&spec)?;
                save(format!("{seed:04}_swap.png"), &swapped_image)?;
                let swapped_objects = measure_objects(&swapped_image, &scene);
                result.swap = Some(judge_swap(
                    &source_objects,
                    &swapped_objects,
                    target,
                    new_shape,
                    width,
                    args.centroid_tolerance_px,
                ));
                if args.baseline {
                    let mut plain_request = request.clone();
                    plain_request.prompt.clone_from(&result.swap_caption);
                    let plain = generate(&model, &plain_request, None, &mut |_| Ok(()), &cancel)?;
                    save(format!("{seed:04}_swap_plain.png"), &plain.image)?;
                    let plain_objects = measure_objects(&plain.image, &scene);
                    result.baseline = Some(judge_swap(
                        &source_objects,
                        &plain_objects,
                        target,
                        new_shape,
                        width,
                        args.centroid_tolerance_px,
                    ));
                }
            }
            let mut words: Vec<&str> = Vec::new();
            if reweight_colour {
                words.push(target_object.colour.word());
            }
            if reweight_shape {
                words.push(target_object.shape.word());
            }
            let unique = words
                .iter()
                .all(|word| scene.caption.split(' ').filter(|w| w == word).count() == 1);
            if unique {
                for &scale in &scales {
                    let spec = EditSpec {
                        cross_window: CrossWindow::uniform(cross),
                        self_replace: reweight_self_replace,
                        reweights: words
                            .iter()
                            .map(|word| Reweight {
                                word: (*word).to_string(),
                                scale,
                            })
                            .collect(),
                        ..EditSpec::new(scene.caption.clone())
                    };
                    let reweighted_image = edited_image(&spec)?;
                    save(format!("{seed:04}_reweight_{scale}.png"), &reweighted_image)?;
                    let objects = measure_objects(&reweighted_image, &scene);
                    let source_area = source_objects[target].area.max(1) as f32;
                    let area_ratio = objects[target].area as f32 / source_area;
                    result.reweights.push(ReweightVerdict {
                        scale,
                        word: words.join("+"),
                        removed: !objects[target].found,
                        weakened: !objects[target].found || area_ratio <= 0.5,
                        area_ratio,
                        others_unchanged: others_unchanged(
                            &source_objects,
                            &objects,
                            target,
                            width,
                            args.centroid_tolerance_px,
                        ),
                    });
                }
            }
        }
        result.seconds = started.elapsed().as_secs_f64();
        let swap_text = match &result.swap {
            Some(verdict) => format!(
                "swap {} (shift {:.1} px, box {:.1} px, new shape {}, others {})",
                if verdict.success { "ok" } else { "FAILED" },
                verdict.target_shift_px.unwrap_or(f32::NAN),
                verdict.target_box_shift_px.unwrap_or(f32::NAN),
                verdict.new_shape_drawn,
                verdict.others_unchanged,
            ),
            None if !result.source_has_target => "source lacks the target, skipped".to_string(),
            None => "swap skipped".to_string(),
        };
        let reweight_text: String = result
            .reweights
            .iter()
            .map(|r| {
                format!(
                    "; reweight {}={}: area x{:.2}{}",
                    r.word,
                    r.scale,
                    r.area_ratio,
                    if r.removed { " removed" } else { "" }
                )
            })
            .collect();
        eprintln!(
            "seed {seed}: {:?} -> {:?}: {swap_text}{reweight_text}",
            result.caption, result.swap_caption,
        );
        results.push(result);
    }
    let summary = summarise(&results, &scales);
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "settings": {
                "count": args.count,
                "start": args.start,
                "steps": args.steps,
                "guidance": args.guidance,
                "cross_replace": args.cross_replace,
                "self_replace": [self_replace.window.start, self_replace.window.end],
                "self_replace_max_side": self_replace.max_queries.isqrt(),
                "reweight_self_replace": [
                    reweight_self_replace.window.start,
                    reweight_self_replace.window.end,
                ],
                "reweight_self_replace_max_side": reweight_self_replace.max_queries.isqrt(),
                "local_blend": args.local_blend,
                "blend_threshold": args.blend_threshold,
                "reweight_word": args.reweight_word,
                "centroid_tolerance_px_at_64": args.centroid_tolerance_px,
                "model": model.name(),
            },
            "summary": summary,
            "seeds": results,
        }))?;
        write_atomically(path, |file| file.write_all(text.as_bytes()))?;
    }
    if let Some(dir) = images_out {
        dir.keep();
    }
    Ok(())
}

/// `count` of `total` in percent with one decimal; null when `total` is 0.
pub(super) fn rate(count: usize, total: usize) -> serde_json::Value {
    if total == 0 {
        serde_json::Value::Null
    } else {
        serde_json::json!((count as f64 / total as f64 * 1000.0).round() / 10.0)
    }
}

/// The rates of a set of swap verdicts.
pub(super) fn swap_summary(verdicts: &[&SwapVerdict]) -> serde_json::Value {
    serde_json::json!({
        "cases": verdicts.len(),
        "success_percent": rate(verdicts.iter().filter(|v| v.success).count(), verdicts.len()),
        "success_by_box_centre_percent": rate(verdicts.iter().filter(|v| v.success_by_box).count(), verdicts.len()),
        "success_with_new_shape_percent": rate(verdicts.iter().filter(|v| v.success_with_new_shape).count(), verdicts.len()),
        "target_kept_percent": rate(verdicts.iter().filter(|v| v.target_kept).count(), verdicts.len()),
        "others_unchanged_percent": rate(verdicts.iter().filter(|v| v.others_unchanged).count(), verdicts.len()),
        "new_shape_drawn_percent": rate(verdicts.iter().filter(|v| v.new_shape_drawn).count(), verdicts.len()),
    })
}

/// Rates over the evaluated seeds.
fn summarise(results: &[SeedResult], scales: &[f32]) -> serde_json::Value {
    let swaps: Vec<&SwapVerdict> = results.iter().filter_map(|r| r.swap.as_ref()).collect();
    let baselines: Vec<&SwapVerdict> = results.iter().filter_map(|r| r.baseline.as_ref()).collect();
    let reweights: Vec<serde_json::Value> = scales
        .iter()
        .map(|&scale| {
            let verdicts: Vec<&ReweightVerdict> = results
                .iter()
                .flat_map(|r| &r.reweights)
                .filter(|v| v.scale == scale)
                .collect();
            let mut ratios: Vec<f32> = verdicts.iter().map(|v| v.area_ratio).collect();
            ratios.sort_by(f32::total_cmp);
            serde_json::json!({
                "scale": scale,
                "cases": verdicts.len(),
                "removed_percent": rate(verdicts.iter().filter(|v| v.removed).count(), verdicts.len()),
                "removed_or_weakened_percent": rate(verdicts.iter().filter(|v| v.weakened).count(), verdicts.len()),
                "others_unchanged_percent": rate(verdicts.iter().filter(|v| v.others_unchanged).count(), verdicts.len()),
                "median_area_ratio": ratios.get(ratios.len() / 2),
            })
        })
        .collect();
    let mut seconds: Vec<f64> = results.iter().map(|r| r.seconds).collect();
    seconds.sort_by(f64::total_cmp);
    serde_json::json!({
        "seeds": results.len(),
        "source_lacks_target": results.iter().filter(|r| !r.source_has_target).count(),
        "swap": swap_summary(&swaps),
        "swap_without_p2p": if baselines.is_empty() { serde_json::Value::Null } else { swap_summary(&baselines) },
        "reweight": reweights,
        "median_seconds_per_seed": seconds.get(seconds.len() / 2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_blend_words_name_the_target_by_occurrence() {
        let scene = generate_scene(3, &SceneOptions::default());
        let mut objects = scene.objects.clone();
        objects.truncate(1);
        let mut second = objects[0].clone();
        second.colour = if objects[0].colour == Colour::ALL[0] {
            Colour::ALL[1]
        } else {
            Colour::ALL[0]
        };
        objects.push(second);
        let shape = objects[0].shape;
        let new_shape = next_shape(shape);
        let words = swap_blend_words(&objects, 1, new_shape);
        assert_eq!(
            words,
            vec![
                format!("{}#1", objects[1].colour.word()),
                format!("source:{}#2", shape.word()),
                format!("edit:{}#1", new_shape.word()),
            ]
        );
        assert!(swap_blend_words(&objects, 5, new_shape).is_empty());
    }
}
