//! `attend edit`: Prompt-to-Prompt. Generates the source prompt's image and the edited prompt's image
//! from the same noise, the edited one taking its attention from the source (word swap, refine,
//! reweight, local blend).

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::alignment::EditKind;
use attend::analysis::edit_spec::EditDefaults;
use attend::analysis::edit_spec::{
    BlendMask, CrossWindow, EditSpec, LocalBlendConfig, Reweight, SelfReplace, StepWindow,
};
use attend::analysis::export::{
    a1111_parameters, write_atomically, write_attention_safetensors, write_png_rgb,
};
use attend::analysis::heatmap::resize_nearest;
use attend::analysis::scene_check::{find_object, palette_labels};
use attend::attention::edit_sampling::{
    generate_edit, generate_edited_branch, record_source, EditBranch, EditObservers, EditOutput,
    EditRequest, EditStepReport,
};
use attend::attention::p2p::RecordConfig;
use attend::attention::store::{AttentionStore, StoreConfig};
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{generate, RgbImage};
use attend::pipeline::sampling::{CancelToken, GenerateRequest};
use attend::scenes::{generate_scene, Colour, Scene, SceneObject, SceneOptions, Shape};
use std::sync::Arc;

use super::generate::{check_writable_parent, daam_heatmaps, generation_parameters};
use super::{load_model, ModelArgs, SamplingArgs};

/// Arguments of `attend edit`. Flag names are stable: scripts rely on them.
#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// The source prompt.
    #[arg(long)]
    pub prompt: String,
    /// The edited prompt: the same words with some swapped (replace), or words added/removed (refine).
    #[arg(long)]
    pub edit_prompt: String,
    /// How the prompts relate: auto (same word count: replace, else refine), replace or refine.
    #[arg(long, default_value = "auto")]
    pub edit_kind: String,
    /// Scale the edited prompt's attention to a word: WORD=SCALE (0 removes, negative inverts). Repeatable.
    #[arg(long, value_name = "WORD=SCALE")]
    pub reweight: Vec<String>,
    /// Cross-attention replacement window: a fraction F (steps 0..F) or START:END.
    #[arg(long, default_value = "0.8", value_name = "F|START:END")]
    pub cross_replace: String,
    /// Cross-attention window of one word of the edited prompt: WORD=F or WORD=START:END. Repeatable.
    #[arg(long, value_name = "WORD=F|WORD=START:END")]
    pub cross_replace_word: Vec<String>,
    /// Self-attention replacement window: a fraction F or START:END. Default: when the edited prompt
    /// changes words, the model's recommendation (`_attend_edit_defaults` in model_index.json; 0.2
    /// for the bundled model), else the reference's 0.4.
    #[arg(long, value_name = "F|START:END")]
    pub self_replace: Option<String>,
    /// Self-attention is replaced only in layers whose query grid side is at most this. Default: when
    /// the edited prompt changes words, the model's recommendation (32 for the bundled model), else
    /// the reference's 16.
    #[arg(long, value_name = "SIDE")]
    pub self_replace_max_side: Option<usize>,
    /// Local blend: only the region of these words may change (WORD[,WORD]; looked up in both prompts;
    /// `square#2` names the second "square" of a prompt alone; `source:WORD` / `edit:WORD` look it up
    /// in one prompt only).
    #[arg(long, value_name = "WORD[,WORD]")]
    pub local_blend: Option<String>,
    /// Local blend: words whose region must not change (WORD[,WORD]).
    #[arg(long, value_name = "WORD[,WORD]")]
    pub blend_subtract: Option<String>,
    /// Local blend threshold on the max-normalised word map.
    #[arg(long, default_value_t = 0.3)]
    pub blend_threshold: f32,
    /// Local blend starts after this fraction of the steps.
    #[arg(long, default_value_t = 0.2)]
    pub blend_start: f64,
    /// Side of the cross-attention grid the blend mask is built from (default: a quarter of the latent side).
    #[arg(long)]
    pub blend_map_side: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed, steps, guidance, scheduler, size, negative prompt and initial noise, shared by both runs.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Run the source first and replay its recorded attention into an edited-only run (what the
    /// editor does), instead of running both prompts in one batch.
    #[arg(long)]
    pub replay: bool,
    /// Also write `source_attention.safetensors` and `edited_attention.safetensors` (the layout of
    /// `attend generate --attention-out`).
    #[arg(long)]
    pub attention_out: bool,
    /// Folder for `source.png`, `edited.png`, `blend_mask.png` (with local blend), `alignment.json`.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Print nothing but errors.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Run `attend edit`.
pub fn run(args: &EditArgs) -> anyhow::Result<()> {
    // Checked before the model loads, so a typo is reported at once.
    edit_spec(args, EditDefaults::default())?;
    args.sampling.check()?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create --out-dir {}", args.out_dir.display()))?;
    check_writable_parent(&args.out_dir.join("source.png"))?;
    let model = load_model(&args.model)?;
    let spec = edit_spec(args, model.edit_defaults())?;
    let request = args.sampling.request(&model, &args.prompt)?;
    let edit_request = EditRequest {
        generate: request,
        spec,
        replay: args.replay,
    };

    let store_for = |prompt: &str| -> anyhow::Result<AttentionStore> {
        Ok(AttentionStore::new(StoreConfig {
            keep_self: false,
            ..StoreConfig::new(model.tokenizer.encode(prompt)?.token_count())
        }))
    };
    let mut source_store = store_for(&args.prompt)?;
    let mut edited_store = store_for(&args.edit_prompt)?;
    let observers = if args.attention_out {
        EditObservers {
            source: Some(&mut source_store),
            edited: Some(&mut edited_store),
        }
    } else {
        EditObservers::default()
    };
    let started = Instant::now();
    let quiet = args.quiet;
    let mut on_step = |report: &EditStepReport| {
        if !quiet {
            let branch = match report.branch {
                EditBranch::Both => "source + edit",
                EditBranch::Source => "source",
                EditBranch::Edited => "edit",
            };
            eprint!(
                "\r{branch}: step {}/{}  {:.1} s   ",
                report.step_index + 1,
                report.step_count,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    };
    let output = generate_edit(
        &model,
        &edit_request,
        observers,
        &mut on_step,
        &CancelToken::new(),
    )?;
    if !quiet {
        eprintln!(
            "\rdone in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            " ".repeat(30)
        );
        for pair in &output.alignment.words {
            eprintln!(
                "  {:>12}  {:<8} {}",
                pair.source_text,
                format!("{:?}", pair.change).to_lowercase(),
                pair.edit_text
            );
        }
    }
    let mut warnings = output.source.warnings.clone();
    warnings.dedup();
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    write_outputs(args, &model, &edit_request, &output)?;
    if args.attention_out {
        for (store, run, name) in [
            (
                &mut source_store,
                &output.source,
                "source_attention.safetensors",
            ),
            (
                &mut edited_store,
                &output.edited,
                "edited_attention.safetensors",
            ),
        ] {
            store.finish_step()?;
            let words = &run.prompt_tokens.words;
            let heatmaps = daam_heatmaps(store, words, run.image.height, run.image.width);
            write_attention_safetensors(
                &args.out_dir.join(name),
                &store.cross_by_resolution(),
                &heatmaps,
                words,
                &run.prompt_tokens.tokens,
            )?;
        }
    }
    Ok(())
}

/// Writes `source.png`, `edited.png`, `blend_mask.png` (with local blend) and `alignment.json`.
fn write_outputs(
    args: &EditArgs,
    model: &StableDiffusion,
    request: &EditRequest,
    output: &EditOutput,
) -> anyhow::Result<()> {
    let source_parameters = generation_parameters(model, &request.generate, &output.source);
    let mut edited_request = request.generate.clone();
    edited_request.prompt.clone_from(&request.spec.edit_prompt);
    let mut edited_parameters = generation_parameters(model, &edited_request, &output.edited);
    edited_parameters.extra.push((
        "Prompt-to-Prompt".to_string(),
        serde_json::to_string(&request.spec)?,
    ));
    edited_parameters.extra.push((
        "P2P source prompt".to_string(),
        request.generate.prompt.clone(),
    ));
    for (run, parameters, name) in [
        (&output.source, source_parameters, "source.png"),
        (&output.edited, edited_parameters, "edited.png"),
    ] {
        let image = &run.image;
        write_png_rgb(
            &args.out_dir.join(name),
            image.width,
            image.height,
            &image.pixels,
            Some(&a1111_parameters(&parameters)),
        )?;
    }
    if let Some(mask) = output.blend_masks.iter().rev().flatten().next() {
        let (width, height) = (output.edited.image.width, output.edited.image.height);
        let resized = resize_nearest(&mask.data, mask.h, mask.w, height, width);
        let rgb: Vec<u8> = resized
            .iter()
            .flat_map(|&value| {
                let grey = if value > 0.5 { 255 } else { 0 };
                [grey; 3]
            })
            .collect();
        write_png_rgb(
            &args.out_dir.join("blend_mask.png"),
            width,
            height,
            &rgb,
            Some("local blend mask of the last step (white: may change)"),
        )?;
    }
    let alignment = serde_json::json!({
        "source_prompt": request.generate.prompt,
        "edit": request.spec,
        "kind": output.alignment.kind,
        "words": output.alignment.words,
        "blend_mask_coverage": output
            .blend_masks
            .iter()
            .map(|mask| mask.as_ref().map(BlendMask::coverage))
            .collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&alignment)?;
    write_atomically(&args.out_dir.join("alignment.json"), |file| {
        file.write_all(text.as_bytes())
    })?;
    Ok(())
}

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
    #[arg(long, default_value_t = 100)]
    pub count: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Guidance scale (default: the generate default).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Cross-attention replacement window of the swap (F or START:END).
    #[arg(long, default_value = "0.8")]
    pub cross_replace: String,
    /// Self-attention replacement window (F or START:END), for swaps and reweights. Default: for
    /// swaps the model's recommendation (0.2 for the bundled model), else the reference's 0.4; for
    /// reweights (the prompt unchanged) the reference's 0.4.
    #[arg(long, value_name = "F|START:END")]
    pub self_replace: Option<String>,
    /// Self-attention is replaced only in layers whose query grid side is at most this. Default: for
    /// swaps the model's recommendation (32 for the bundled model), else the reference's 16; for
    /// reweights 16.
    #[arg(long, value_name = "SIDE")]
    pub self_replace_max_side: Option<usize>,
    /// Local blend for the swap, as Prompt-to-Prompt's word-swap examples use it: only the region of
    /// the target object's colour word and of its old and new shape words may change (each named by
    /// its occurrence, `square#2`, so another object of the same shape stays closed).
    #[arg(long)]
    pub local_blend: bool,
    /// Local blend threshold on the max-normalised word map (with `--local-blend`).
    #[arg(long, default_value_t = 0.3)]
    pub blend_threshold: f32,
    /// Reweight scales to measure, comma-separated (empty: none).
    #[arg(long, default_value = "0,-1", allow_hyphen_values = true)]
    pub reweight_scales: String,
    /// Which words of the target to reweight: shape, colour or both.
    #[arg(long, default_value = "both")]
    pub reweight_word: String,
    /// Centroid tolerance in pixels at 64 px (scaled to the image size).
    #[arg(long, default_value_t = 4.0)]
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
}

/// What was measured for one object of a scene in a generated image.
#[derive(Clone, Debug, serde::Serialize)]
struct FoundObject {
    colour: Colour,
    found: bool,
    centroid_px: Option<(f32, f32)>,
    /// Centre of the bounding box (does not move when a shape changes into another of the same box).
    box_centre_px: Option<(f32, f32)>,
    area: usize,
    shape: Option<Shape>,
}

fn measure_objects(image: &RgbImage, scene: &Scene) -> Vec<FoundObject> {
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
struct SwapVerdict {
    target_kept: bool,
    target_shift_px: Option<f32>,
    /// Shift of the target's bounding-box centre (at 64 px).
    target_box_shift_px: Option<f32>,
    /// Success judged by the bounding-box centre instead of the centroid.
    success_by_box: bool,
    /// Success, and the target now has the new shape (the edit took).
    success_with_new_shape: bool,
    new_shape_drawn: bool,
    others_unchanged: bool,
    success: bool,
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

fn judge_swap(
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
fn swap_shape_word(caption: &str, target: usize, new_shape: Shape) -> String {
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
fn swap_blend_words(objects: &[SceneObject], target: usize, new_shape: Shape) -> Vec<String> {
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

fn next_shape(shape: Shape) -> Shape {
    let index = Shape::ALL.iter().position(|&s| s == shape).unwrap_or(0);
    Shape::ALL[(index + 1) % Shape::ALL.len()]
}

/// Run `attend edit-eval`.
pub fn run_eval(args: &EditEvalArgs) -> anyhow::Result<()> {
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
            text.parse::<f32>()
                .with_context(|| format!("--reweight-scales: {text:?} is not a number"))
        })
        .collect::<anyhow::Result<_>>()?;
    check_blend_threshold(args.blend_threshold)?;
    let (reweight_shape, reweight_colour) = match args.reweight_word.as_str() {
        "shape" => (true, false),
        "colour" | "color" => (false, true),
        "both" => (true, true),
        other => anyhow::bail!("--reweight-word {other:?}: expected shape, colour or both"),
    };
    if let Some(dir) = &args.images_out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --images-out {}", dir.display()))?;
    }
    if let Some(path) = &args.json_out {
        check_writable_parent(path)?;
    }
    let model = load_model(&args.model)?;
    // Swaps change a word and take the model's recommendation; reweights keep the source prompt
    // and take the reference's setting (`SelfReplace::for_edit`), unless the flags say.
    let self_replace = self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        SelfReplace::recommended(model.edit_defaults()),
    )?;
    let reweight_self_replace = self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        SelfReplace::default(),
    )?;
    for (what, setting) in [
        ("swaps", self_replace),
        ("reweights", reweight_self_replace),
    ] {
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
    let cancel = CancelToken::new();
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
    Ok(())
}

/// Rates over the evaluated seeds.
fn summarise(results: &[SeedResult], scales: &[f32]) -> serde_json::Value {
    let rate = |count: usize, total: usize| {
        if total == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!((count as f64 / total as f64 * 1000.0).round() / 10.0)
        }
    };
    let swaps: Vec<&SwapVerdict> = results.iter().filter_map(|r| r.swap.as_ref()).collect();
    let baselines: Vec<&SwapVerdict> = results.iter().filter_map(|r| r.baseline.as_ref()).collect();
    let swap_summary = |verdicts: &[&SwapVerdict]| {
        serde_json::json!({
            "cases": verdicts.len(),
            "success_percent": rate(verdicts.iter().filter(|v| v.success).count(), verdicts.len()),
            "success_by_box_centre_percent": rate(verdicts.iter().filter(|v| v.success_by_box).count(), verdicts.len()),
            "success_with_new_shape_percent": rate(verdicts.iter().filter(|v| v.success_with_new_shape).count(), verdicts.len()),
            "target_kept_percent": rate(verdicts.iter().filter(|v| v.target_kept).count(), verdicts.len()),
            "others_unchanged_percent": rate(verdicts.iter().filter(|v| v.others_unchanged).count(), verdicts.len()),
            "new_shape_drawn_percent": rate(verdicts.iter().filter(|v| v.new_shape_drawn).count(), verdicts.len()),
        })
    };
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

/// `--self-replace` and `--self-replace-max-side`, each falling back to `recommended` (the model's
/// recommendation for the edit, [`SelfReplace::for_edit`]).
fn self_replace_from_args(
    window: Option<&str>,
    max_side: Option<usize>,
    recommended: SelfReplace,
) -> anyhow::Result<SelfReplace> {
    let window = match window {
        Some(text) => parse_window(text).context("--self-replace")?,
        None => recommended.window,
    };
    let max_queries = match max_side {
        Some(0) => anyhow::bail!("--self-replace-max-side 0: a grid side is at least 1"),
        Some(side) => side
            .checked_mul(side)
            .with_context(|| format!("--self-replace-max-side {side} is too large"))?,
        None => recommended.max_queries,
    };
    Ok(SelfReplace {
        window,
        max_queries,
    })
}

/// The [`EditSpec`] the arguments describe, with `defaults` (the model's recommendation) where a
/// self-attention flag is left out.
pub fn edit_spec(args: &EditArgs, defaults: EditDefaults) -> anyhow::Result<EditSpec> {
    let kind = match args.edit_kind.trim().to_ascii_lowercase().as_str() {
        "auto" => None,
        "replace" | "swap" => Some(EditKind::Replace),
        "refine" => Some(EditKind::Refine),
        other => anyhow::bail!("--edit-kind {other:?}: expected auto, replace or refine"),
    };
    let cross_default = parse_window(&args.cross_replace).context("--cross-replace")?;
    let per_word = args
        .cross_replace_word
        .iter()
        .map(|text| {
            let (word, window) = split_word_value(text).context("--cross-replace-word")?;
            let window =
                parse_window(window).with_context(|| format!("--cross-replace-word {text:?}"))?;
            Ok((word.to_string(), window))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let reweights = args
        .reweight
        .iter()
        .map(|text| {
            let (word, scale) = split_word_value(text).context("--reweight")?;
            let scale: f32 = scale
                .trim()
                .parse()
                .with_context(|| format!("--reweight {text:?}: {scale:?} is not a number"))?;
            anyhow::ensure!(
                scale.is_finite(),
                "--reweight {text:?}: scale must be finite"
            );
            Ok(Reweight {
                word: word.to_string(),
                scale,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let self_replace = self_replace_from_args(
        args.self_replace.as_deref(),
        args.self_replace_max_side,
        SelfReplace::for_edit(
            SelfReplace::recommended(defaults),
            &args.prompt,
            &args.edit_prompt,
        ),
    )?;
    let local_blend = match &args.local_blend {
        Some(words) => {
            check_blend_threshold(args.blend_threshold)?;
            anyhow::ensure!(
                (0.0..=1.0).contains(&args.blend_start),
                "--blend-start {} is outside 0..1",
                args.blend_start
            );
            Some(LocalBlendConfig {
                words: split_words(words),
                subtract_words: args
                    .blend_subtract
                    .as_deref()
                    .map(split_words)
                    .unwrap_or_default(),
                threshold: args.blend_threshold,
                subtract_threshold: args.blend_threshold,
                start_fraction: args.blend_start,
                map_side: args.blend_map_side,
                mask: None,
            })
        }
        None => {
            anyhow::ensure!(
                args.blend_subtract.is_none(),
                "--blend-subtract needs --local-blend"
            );
            None
        }
    };
    if let Some(blend) = &local_blend {
        anyhow::ensure!(!blend.words.is_empty(), "--local-blend names no word");
    }
    Ok(EditSpec {
        edit_prompt: args.edit_prompt.clone(),
        kind,
        cross_window: CrossWindow {
            default: cross_default,
            per_word,
        },
        self_replace,
        reweights,
        local_blend,
    })
}

/// `--blend-threshold` must be a fraction in `0..=1`.
fn check_blend_threshold(threshold: f32) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&threshold),
        "--blend-threshold {threshold} is outside 0..1"
    );
    Ok(())
}

/// `F` -> `0..F`; `START:END` -> `START..END`; fractions in `0..=1`.
fn parse_window(text: &str) -> anyhow::Result<StepWindow> {
    let fraction = |part: &str| -> anyhow::Result<f64> {
        let value: f64 = part
            .trim()
            .parse()
            .with_context(|| format!("{part:?} is not a number"))?;
        anyhow::ensure!(
            (0.0..=1.0).contains(&value),
            "{value} is outside 0..1 (a fraction of the steps)"
        );
        Ok(value)
    };
    match text.split_once(':') {
        Some((start, end)) => {
            let (start, end) = (fraction(start)?, fraction(end)?);
            anyhow::ensure!(start <= end, "window {text:?} ends before it starts");
            Ok(StepWindow::new(start, end))
        }
        None => Ok(StepWindow::until(fraction(text)?)),
    }
}

/// `WORD=VALUE` -> (`WORD`, `VALUE`), both non-empty.
fn split_word_value(text: &str) -> anyhow::Result<(&str, &str)> {
    let (word, value) = text
        .rsplit_once('=')
        .with_context(|| format!("{text:?} is not WORD=VALUE"))?;
    let word = word.trim();
    anyhow::ensure!(
        !word.is_empty() && !value.trim().is_empty(),
        "{text:?} is not WORD=VALUE"
    );
    Ok((word, value))
}

/// `"cat, dog"` -> `["cat", "dog"]`.
fn split_words(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|word| !word.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

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

    fn parse(extra: &[&str]) -> anyhow::Result<EditSpec> {
        parse_for_model(extra, EditDefaults::default())
    }

    fn parse_for_model(extra: &[&str], defaults: EditDefaults) -> anyhow::Result<EditSpec> {
        let mut argv = vec![
            "attend",
            "edit",
            "--prompt",
            "a red circle",
            "--edit-prompt",
            "a red square",
            "--out-dir",
            "out",
        ];
        argv.extend_from_slice(extra);
        let cli = super::super::Cli::try_parse_from(argv)?;
        match cli.command {
            Some(super::super::Command::Edit(args)) => edit_spec(&args, defaults),
            _ => anyhow::bail!("not an edit command"),
        }
    }

    #[test]
    fn defaults_follow_the_reference() {
        let spec = parse(&[]).unwrap();
        assert_eq!(spec, EditSpec::new("a red square"));
        assert_eq!(spec.cross_window.default, StepWindow::until(0.8));
        assert_eq!(spec.self_replace.window, StepWindow::until(0.4));
        assert_eq!(spec.self_replace.max_queries, 256);
    }

    #[test]
    fn self_flags_left_out_take_the_model_recommendation() {
        let bundled_like = EditDefaults {
            self_replace_end: Some(0.2),
            self_replace_max_side: Some(32),
        };
        let spec = parse_for_model(&[], bundled_like).unwrap();
        assert_eq!(spec.self_replace.window, StepWindow::until(0.2));
        assert_eq!(spec.self_replace.max_queries, 32 * 32);
        let spec = parse_for_model(&["--self-replace-max-side", "16"], bundled_like).unwrap();
        assert_eq!(spec.self_replace.window, StepWindow::until(0.2));
        assert_eq!(spec.self_replace.max_queries, 256);
        let spec = parse_for_model(&["--self-replace", "0.4"], bundled_like).unwrap();
        assert_eq!(spec.self_replace.window, StepWindow::until(0.4));
        assert_eq!(spec.self_replace.max_queries, 32 * 32);
        // The test's prompt pair swaps a word; a reweight of the source prompt keeps the reference.
        let cli = super::super::Cli::try_parse_from([
            "attend",
            "edit",
            "--prompt",
            "a red circle",
            "--edit-prompt",
            "A red circle",
            "--reweight",
            "circle=0",
            "--out-dir",
            "out",
        ])
        .unwrap();
        let Some(super::super::Command::Edit(args)) = cli.command else {
            panic!("not an edit command");
        };
        let spec = edit_spec(&args, bundled_like).unwrap();
        assert_eq!(spec.self_replace, SelfReplace::default());
        let err = parse_for_model(&["--self-replace-max-side", "0"], bundled_like).unwrap_err();
        assert!(
            format!("{err:#}").contains("--self-replace-max-side 0"),
            "{err:#}"
        );
    }

    #[test]
    fn windows_reweights_and_blend_parse() {
        let spec = parse(&[
            "--cross-replace",
            "0.1:0.9",
            "--cross-replace-word",
            "square=0.5",
            "--cross-replace-word",
            "red=0.2:0.6",
            "--self-replace",
            "0.3",
            "--reweight",
            "red=-1.5",
            "--reweight",
            "square=0",
            "--local-blend",
            "circle, square",
            "--blend-subtract",
            "red",
            "--blend-threshold",
            "0.4",
            "--edit-kind",
            "refine",
        ])
        .unwrap();
        assert_eq!(spec.kind, Some(EditKind::Refine));
        assert_eq!(spec.cross_window.default, StepWindow::new(0.1, 0.9));
        assert_eq!(
            spec.cross_window.per_word,
            vec![
                ("square".to_string(), StepWindow::until(0.5)),
                ("red".to_string(), StepWindow::new(0.2, 0.6)),
            ]
        );
        assert_eq!(spec.self_replace.window, StepWindow::until(0.3));
        assert_eq!(spec.reweights[0].scale, -1.5);
        assert_eq!(spec.reweights[1].word, "square");
        let blend = spec.local_blend.unwrap();
        assert_eq!(blend.words, vec!["circle", "square"]);
        assert_eq!(blend.subtract_words, vec!["red"]);
        assert_eq!(blend.threshold, 0.4);
        assert_eq!(blend.start_fraction, 0.2);
    }

    #[test]
    fn bad_values_are_reported_with_their_flag() {
        for (extra, flag) in [
            (vec!["--cross-replace", "1.5"], "--cross-replace"),
            (vec!["--cross-replace", "0.8:0.2"], "--cross-replace"),
            (vec!["--reweight", "red"], "--reweight"),
            (vec!["--reweight", "red=lots"], "--reweight"),
            (vec!["--cross-replace-word", "=0.3"], "--cross-replace-word"),
            (vec!["--edit-kind", "swapish"], "--edit-kind"),
            (vec!["--blend-subtract", "red"], "--blend-subtract"),
        ] {
            let error = parse(&extra).unwrap_err();
            assert!(format!("{error:#}").contains(flag), "{extra:?}: {error:#}");
        }
    }
}
