//! Inversion measured on drawn scenes of attend's generator (given images whose content is known):
//! `attend invert-eval` prints the reconstruction PSNR and the seconds per inversion of each
//! method, and `attend edit-eval --real-images` judges Prompt-to-Prompt word swaps of the inverted
//! scenes the way `edit-eval` judges them on generated ones.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use attend::analysis::edit_spec::{
    CrossWindow, EditSpec, LocalBlendConfig, Reweight, SelfReplace, StepWindow,
};
use attend::analysis::export::{write_atomically, write_png_rgb};
use attend::attention::edit_sampling::{generate_edited_branch, invert_recording_source};
use attend::attention::p2p::{RecordConfig, INVERTED_IMAGE_SWAP};
use attend::hook::CancelToken;
use attend::pipeline::inversion::{invert, Inversion, InversionMethod, InversionRequest};
use attend::pipeline::model::StableDiffusion;
use attend::pipeline::sampling::{generate, GenerateRequest, RgbImage};
use attend::scenes::{generate_scene, Scene, SceneOptions};

use super::checks::{at_least_one, check_output_file, non_negative, OutDir};
use super::edit_eval::{
    judge_swap, measure_objects, next_shape, real_image_local_blend, swap_blend_words,
    swap_shape_word, swap_summary, EditEvalArgs, SwapVerdict,
};
use super::images::{parse_methods, psnr_db, replay_inversion, DEFAULT_INVERSION_METHOD};
use super::{load_model, ModelArgs};

/// A comma-separated method list flag; `None` gives the default method alone.
pub fn methods_flag(flag: &str, text: Option<&str>) -> anyhow::Result<Vec<InversionMethod>> {
    match text {
        Some(text) => parse_methods(text).map_err(|reason| anyhow::anyhow!("{flag}: {reason}")),
        None => Ok(vec![DEFAULT_INVERSION_METHOD]),
    }
}

/// Arguments of `attend invert-eval`: per method, how well drawn scenes come back from their
/// inversion (PSNR against the drawn image) and how long an inversion takes.
#[derive(Debug, clap::Args)]
pub struct InvertEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of scenes (seeds).
    #[arg(long, default_value_t = 10, value_parser = non_negative, allow_negative_numbers = true)]
    pub count: u64,
    /// First seed (the bundled model was trained on seeds from 1,000,000 on; lower ones are
    /// unseen).
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub start: u64,
    /// Methods to compare, comma-separated.
    #[arg(long, default_value = "ddim,negative-prompt,direct,ddpm")]
    pub methods: String,
    /// DDIM steps of each inversion.
    #[arg(long, default_value_t = 20, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Guidance scale of the replay (default: the generate default).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    /// Seed of `ddpm`'s noise draws.
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub seed: u64,
    /// Write per-scene results and the summary as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Write each scene and its reconstructions here.
    #[arg(long)]
    pub images_out: Option<PathBuf>,
}

/// A drawn scene as an RGB image.
fn scene_image(scene: &Scene) -> RgbImage {
    RgbImage {
        width: scene.size_px,
        height: scene.size_px,
        pixels: scene.rgb.clone(),
    }
}

/// Inverts a drawn scene (already the model's size) with its caption; returns the inversion and
/// the seconds it took.
fn invert_scene(
    model: &StableDiffusion,
    image: &RgbImage,
    request: &InversionRequest,
    cancel: &CancelToken,
) -> anyhow::Result<(Arc<Inversion>, f64)> {
    let started = Instant::now();
    let inversion = invert(model, image, request, &mut |_| Ok(()), cancel)
        .with_context(|| format!("cannot invert {:?} with {}", request.prompt, request.method))?;
    Ok((inversion, started.elapsed().as_secs_f64()))
}

/// The guidance of a run: the flag, else the generate default.
fn guidance_or_default(model: &StableDiffusion, guidance: Option<f64>) -> anyhow::Result<f64> {
    if let Some(guidance) = guidance {
        anyhow::ensure!(
            guidance.is_finite(),
            "invalid --guidance: {guidance} is not a finite number"
        );
    }
    Ok(guidance.unwrap_or(GenerateRequest::new(model, "").guidance))
}

/// One method on one scene.
#[derive(Clone, Debug, serde::Serialize)]
struct MethodResult {
    method: InversionMethod,
    /// PSNR of the reconstruction against the drawn scene in dB; null when identical.
    psnr_db: Option<f64>,
    /// Mean absolute difference per channel value (of 255).
    mean_abs_difference: f64,
    inversion_seconds: f64,
    /// Seconds of the reconstruction (`invert-eval`) or of the source branch (`edit-eval`).
    reconstruction_seconds: f64,
    /// `edit-eval --real-images`: seconds of the edited branch.
    edit_seconds: Option<f64>,
    /// `edit-eval --real-images`: the swap's verdict.
    swap: Option<SwapVerdict>,
}

/// One scene.
#[derive(Clone, Debug, serde::Serialize)]
struct SceneResult {
    seed: u64,
    caption: String,
    /// `edit-eval --real-images`: the swapped caption and the target object.
    swap_caption: Option<String>,
    target: Option<usize>,
    /// `edit-eval --real-images`: the drawn scene's target was found by colour (else skipped).
    scene_has_target: bool,
    methods: Vec<MethodResult>,
}

/// The median of `values` (upper middle); `None` when empty.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Per method: PSNR (worst, median and mean over the scenes that differ from their drawn image;
/// identical ones are counted), mean absolute difference, median seconds, and with swaps their
/// rates.
fn summarise(results: &[SceneResult], methods: &[InversionMethod]) -> serde_json::Value {
    let per_method: Vec<serde_json::Value> = methods
        .iter()
        .map(|&method| {
            let cases: Vec<&MethodResult> = results
                .iter()
                .flat_map(|result| &result.methods)
                .filter(|result| result.method == method)
                .collect();
            let mut differing: Vec<f64> = cases.iter().filter_map(|case| case.psnr_db).collect();
            let identical = cases.len() - differing.len();
            let mean_psnr = (!differing.is_empty())
                .then(|| differing.iter().sum::<f64>() / differing.len() as f64);
            let worst_psnr = differing.iter().copied().min_by(f64::total_cmp);
            let mean_abs = (!cases.is_empty()).then(|| {
                cases.iter().map(|case| case.mean_abs_difference).sum::<f64>() / cases.len() as f64
            });
            let collect = |value: fn(&MethodResult) -> Option<f64>| -> Vec<f64> {
                cases.iter().filter_map(|case| value(case)).collect()
            };
            let verdicts: Vec<&SwapVerdict> =
                cases.iter().filter_map(|case| case.swap.as_ref()).collect();
            serde_json::json!({
                "method": method.name(),
                "cases": cases.len(),
                "identical_cases": identical,
                "psnr_db_worst": worst_psnr,
                "psnr_db_median_of_differing": median(&mut differing),
                "psnr_db_mean_of_differing": mean_psnr,
                "mean_abs_difference": mean_abs,
                "median_inversion_seconds": median(&mut collect(|case| Some(case.inversion_seconds))),
                "median_reconstruction_seconds": median(&mut collect(|case| Some(case.reconstruction_seconds))),
                "median_edit_seconds": median(&mut collect(|case| case.edit_seconds)),
                "swap": if verdicts.is_empty() { serde_json::Value::Null } else { swap_summary(&verdicts) },
            })
        })
        .collect();
    serde_json::json!({
        "scenes": results.len(),
        "methods": per_method,
    })
}

/// `psnr` as text: `31.20 dB` or `identical`.
fn psnr_text(psnr: Option<f64>) -> String {
    psnr.map_or("identical".to_string(), |db| format!("{db:.2} dB"))
}

/// Writes `image` as `name` into `dir` when given.
fn save_image(dir: Option<&std::path::Path>, name: &str, image: &RgbImage) -> anyhow::Result<()> {
    if let Some(dir) = dir {
        write_png_rgb(
            &dir.join(name),
            image.width,
            image.height,
            &image.pixels,
            None,
        )?;
    }
    Ok(())
}

/// Run `attend invert-eval`.
pub fn run(args: &InvertEvalArgs) -> anyhow::Result<()> {
    let methods = methods_flag("--methods", Some(&args.methods))?;
    if let Some(path) = &args.json_out {
        check_output_file("--json-out", path)?;
    }
    let mut images_out = args
        .images_out
        .as_deref()
        .map(|dir| OutDir::check("--images-out", dir))
        .transpose()?;
    let model = load_model(&args.model)?;
    let guidance = guidance_or_default(&model, args.guidance)?;
    let (width, _) = model.default_size_px();
    let scene_options = SceneOptions {
        size_px: width,
        ..SceneOptions::default()
    };
    let images_dir = match &mut images_out {
        Some(dir) => Some(dir.create()?.to_path_buf()),
        None => None,
    };
    let cancel = CancelToken::new();
    let mut results = Vec::new();
    for seed in args.start..args.start + args.count {
        let scene = generate_scene(seed, &scene_options);
        let image = scene_image(&scene);
        save_image(
            images_dir.as_deref(),
            &format!("{seed:04}_scene.png"),
            &image,
        )?;
        let mut result = SceneResult {
            seed,
            caption: scene.caption.clone(),
            swap_caption: None,
            target: None,
            scene_has_target: true,
            methods: Vec::new(),
        };
        for &method in &methods {
            let request = InversionRequest {
                prompt: scene.caption.clone(),
                method,
                steps: args.steps,
                guidance,
                seed: args.seed,
            };
            let (inversion, inversion_seconds) = invert_scene(&model, &image, &request, &cancel)?;
            let mut replay = GenerateRequest::new(&model, scene.caption.clone());
            replay_inversion(&mut replay, &inversion)?;
            let started = Instant::now();
            let output = generate(&model, &replay, None, &mut |_| Ok(()), &cancel)?;
            let reconstruction_seconds = started.elapsed().as_secs_f64();
            let (psnr, mean_abs) = psnr_db(&output.image, &image)?;
            save_image(
                images_dir.as_deref(),
                &format!("{seed:04}_{}.png", method.name()),
                &output.image,
            )?;
            eprintln!(
                "seed {seed} {:?}: {method}: {} (mean difference {mean_abs:.2}), inverted in \
                 {inversion_seconds:.1} s, reconstructed in {reconstruction_seconds:.1} s",
                scene.caption,
                psnr_text(psnr)
            );
            result.methods.push(MethodResult {
                method,
                psnr_db: psnr,
                mean_abs_difference: mean_abs,
                inversion_seconds,
                reconstruction_seconds,
                edit_seconds: None,
                swap: None,
            });
        }
        results.push(result);
    }
    let summary = summarise(&results, &methods);
    let settings = serde_json::json!({
        "count": args.count,
        "start": args.start,
        "steps": args.steps,
        "guidance": guidance,
        "seed": args.seed,
        "model": model.name(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "settings": settings,
            "summary": summary,
        }))?
    );
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "settings": settings,
            "summary": summary,
            "scenes": results,
        }))?;
        write_atomically(path, |file| file.write_all(text.as_bytes()))?;
    }
    if let Some(dir) = images_out {
        dir.keep();
    }
    Ok(())
}

/// `attend edit-eval --real-images`: per seed, the drawn scene is inverted with each method and its
/// caption's word swap (the `edit-eval` swap) is run on the inversion; the swap is judged against
/// the drawn scene (the target keeps its place and colour, the other objects are unchanged).
pub(super) fn run_real_image_edits(
    args: &EditEvalArgs,
    model: &StableDiffusion,
    methods: &[InversionMethod],
    cross: StepWindow,
    self_replace: SelfReplace,
    mut images_out: Option<OutDir>,
) -> anyhow::Result<()> {
    let guidance = guidance_or_default(model, args.guidance)?;
    let local_blend = real_image_local_blend(args);
    let swap_weight = args
        .swap_weight
        .unwrap_or(INVERTED_IMAGE_SWAP.swapped_word_weight);
    let (width, _) = model.default_size_px();
    let scene_options = SceneOptions {
        size_px: width,
        ..SceneOptions::default()
    };
    let images_dir = match &mut images_out {
        Some(dir) => Some(dir.create()?.to_path_buf()),
        None => None,
    };
    let cancel = CancelToken::new();
    let mut results = Vec::new();
    for seed in args.start..args.start + args.count {
        let scene = generate_scene(seed, &scene_options);
        let image = scene_image(&scene);
        let target = (seed % scene.objects.len() as u64) as usize;
        let new_shape = next_shape(scene.objects[target].shape);
        let swap_caption = swap_shape_word(&scene.caption, target, new_shape);
        let scene_objects = measure_objects(&image, &scene);
        let mut result = SceneResult {
            seed,
            caption: scene.caption.clone(),
            swap_caption: Some(swap_caption.clone()),
            target: Some(target),
            scene_has_target: scene_objects[target].found,
            methods: Vec::new(),
        };
        save_image(
            images_dir.as_deref(),
            &format!("{seed:04}_scene.png"),
            &image,
        )?;
        if !result.scene_has_target {
            eprintln!("seed {seed}: the drawn scene's target is not found by colour, skipped");
            results.push(result);
            continue;
        }
        let local_blend = local_blend.then(|| LocalBlendConfig {
            words: swap_blend_words(&scene.objects, target, new_shape),
            threshold: args.blend_threshold,
            start_fraction: args
                .blend_start
                .unwrap_or(LocalBlendConfig::default().start_fraction),
            ..LocalBlendConfig::default()
        });
        let before = &scene.objects[..target];
        let new_word = format!(
            "{}#{}",
            new_shape.word(),
            1 + before.iter().filter(|o| o.shape == new_shape).count()
        );
        let reweights = if (swap_weight - 1.0).abs() > f32::EPSILON {
            vec![Reweight {
                word: new_word,
                scale: swap_weight,
            }]
        } else {
            Vec::new()
        };
        let spec = EditSpec {
            cross_window: CrossWindow::uniform(cross),
            self_replace,
            local_blend,
            reweights,
            ..EditSpec::new(swap_caption.clone())
        };
        for &method in methods {
            let request = InversionRequest {
                prompt: scene.caption.clone(),
                method,
                steps: args.steps,
                guidance,
                seed,
            };
            // The source branch is recorded during the inversion where the method allows it
            // (`direct`, `ddpm`); its seconds are then what the inversion did not already count.
            let started = Instant::now();
            let inverted = invert_recording_source(
                model,
                &image,
                &request,
                &GenerateRequest::new(model, scene.caption.clone()),
                RecordConfig {
                    self_max_queries: self_replace.max_queries,
                    batch_item: 0,
                },
                &mut |_| Ok(()),
                &cancel,
            )
            .with_context(|| format!("cannot invert {:?} with {method}", request.prompt))?;
            let inversion_seconds = inverted.inversion.seconds;
            let reconstruction_seconds =
                (started.elapsed().as_secs_f64() - inversion_seconds).max(0.0);
            let (replay, source, recording) =
                (inverted.request, inverted.source, inverted.recording);
            let started = Instant::now();
            let branch = generate_edited_branch(
                model,
                &replay,
                &spec,
                recording,
                None,
                &mut |_| Ok(()),
                &cancel,
            )?;
            let edit_seconds = started.elapsed().as_secs_f64();
            let swapped = branch.edited.image;
            let (psnr, mean_abs) = psnr_db(&source.image, &image)?;
            let verdict = judge_swap(
                &scene_objects,
                &measure_objects(&swapped, &scene),
                target,
                new_shape,
                width,
                args.centroid_tolerance_px,
            );
            for (suffix, picture) in [("source", &source.image), ("swap", &swapped)] {
                save_image(
                    images_dir.as_deref(),
                    &format!("{seed:04}_{}_{suffix}.png", method.name()),
                    picture,
                )?;
            }
            eprintln!(
                "seed {seed}: {:?} -> {swap_caption:?}: {method}: source {}, swap {} (shift {:.1} \
                 px, new shape {}, others {}), inverted in {inversion_seconds:.1} s, source \
                 {reconstruction_seconds:.1} s, edit {edit_seconds:.1} s",
                scene.caption,
                psnr_text(psnr),
                if verdict.success { "ok" } else { "FAILED" },
                verdict.target_shift_px.unwrap_or(f32::NAN),
                verdict.new_shape_drawn,
                verdict.others_unchanged,
            );
            result.methods.push(MethodResult {
                method,
                psnr_db: psnr,
                mean_abs_difference: mean_abs,
                inversion_seconds,
                reconstruction_seconds,
                edit_seconds: Some(edit_seconds),
                swap: Some(verdict),
            });
        }
        results.push(result);
    }
    let mut summary = summarise(&results, methods);
    summary["scene_lacks_target"] =
        serde_json::json!(results.iter().filter(|r| !r.scene_has_target).count());
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "settings": {
                "mode": "real images",
                "count": args.count,
                "start": args.start,
                "steps": args.steps,
                "guidance": guidance,
                "methods": methods.iter().map(|method| method.name()).collect::<Vec<_>>(),
                "cross_replace": args.cross_replace,
                "self_replace": [self_replace.window.start, self_replace.window.end],
                "self_replace_max_side": self_replace.max_queries.isqrt(),
                "local_blend": local_blend,
                "blend_start": args.blend_start,
                "blend_threshold": args.blend_threshold,
                "swap_weight": swap_weight,
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
