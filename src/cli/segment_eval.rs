//! `attend segment-eval`: `attend segment` over drawn scenes of attend's generator, scored against
//! the colour regions of the generated images (mIoU of the labelled object masks, label accuracy,
//! time to segment), for each segmentation method and label choice on the same images.

use std::path::PathBuf;
use std::time::Instant;

use attend::analysis::export::write_png_rgb;
use attend::analysis::scene_check::{find_object, iou, palette_labels, ObjectRegion};
use attend::analysis::segment::{LabelChoice, LabelledSegmentation, MaskSettings, SegmentMethod};
use attend::analysis::WordSpan;
use attend::scenes::{generate_scene, SceneOptions};

use super::checks::{at_least_one, check_output_file, non_negative, OutDir};
use super::segment::{
    check_guidance, generate_with_attention, label_words, overlay_segments, segment_generated,
    SegmentationArgs,
};
use super::{load_model, ModelArgs};

/// Arguments of `attend segment-eval`.
#[derive(Debug, clap::Args)]
pub struct SegmentEvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Number of scenes.
    #[arg(long, default_value_t = 100, value_parser = non_negative, allow_negative_numbers = true)]
    pub count: u64,
    /// Seed of the first scene (scene i: caption from generator seed start + i, image seed
    /// start + i; the bundled model trained on seeds from 1,000,000 on).
    #[arg(long, default_value_t = 0, value_parser = non_negative, allow_negative_numbers = true)]
    pub start: u64,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 20, value_parser = at_least_one, allow_negative_numbers = true)]
    pub steps: usize,
    /// Classifier-free guidance scale (default: the generate default).
    #[arg(long, allow_hyphen_values = true)]
    pub guidance: Option<f64>,
    #[command(flatten)]
    pub segmentation: SegmentationArgs,
    /// Write the measurements (summary and per scene) as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Write each image with its segment overlay here, for a look.
    #[arg(long)]
    pub images_out: Option<PathBuf>,
    /// Measure only --method with --label-choice (default: both methods with both label choices,
    /// on the same images).
    #[arg(long)]
    pub single_method: bool,
}
/// What `attend segment-eval` measures on one scene with one method.
#[derive(Debug, serde::Serialize)]
struct SceneMeasurement {
    seed: u64,
    caption: String,
    method: SegmentMethod,
    label_choice: LabelChoice,
    /// Objects the model drew in their colour (largest region of that colour found, at most half
    /// the image).
    objects_drawn: usize,
    /// Objects whose colour covers more than half the image (not counted as drawn).
    objects_flooded: usize,
    objects: usize,
    /// IoU of each drawn object's labelled mask with its colour region, caption order.
    ious: Vec<f32>,
    /// The same with the segments chosen by their overlap with the object instead of their label:
    /// the segmentation's own quality, whatever the labels.
    oracle_ious: Vec<f32>,
    /// Segments lying mostly (> half their pixels) on a drawn object, and how many of them carry
    /// that object's shape word.
    object_segments: usize,
    object_segments_right: usize,
    /// Segments lying mostly off the objects, and how many of them carry no shape word.
    background_segments: usize,
    background_segments_right: usize,
    segments: usize,
    generation_secs: f64,
    segment_secs: f64,
}

/// The summary of `attend segment-eval` for one method.
#[derive(Debug, serde::Serialize)]
struct EvalSummary {
    method: SegmentMethod,
    label_choice: LabelChoice,
    scenes: usize,
    objects: usize,
    objects_drawn: usize,
    objects_flooded: usize,
    mean_iou: f64,
    oracle_mean_iou: f64,
    label_accuracy: f64,
    object_segments: usize,
    background_label_accuracy: f64,
    background_segments: usize,
    mean_segments: f64,
    median_segment_ms: f64,
    mean_segment_ms: f64,
    median_generation_secs: f64,
}

/// Scores a labelled segmentation against the colour regions of the generated image.
fn measure_scene(
    scene: &attend::scenes::Scene,
    image: &attend::pipeline::sampling::RgbImage,
    words: &[WordSpan],
    result: &LabelledSegmentation,
) -> SceneMeasurement {
    let (width, height) = (image.width, image.height);
    let colours = palette_labels(&image.pixels, width, height);
    // Object i of the caption is named by the i-th shape word among the label words.
    let shape_word_indices: Vec<usize> = words
        .iter()
        .enumerate()
        .filter(|(_, word)| word.text.parse::<attend::scenes::Shape>().is_ok())
        .map(|(index, _)| index)
        .collect();
    // An object is drawn when its colour has a region, and that region is not most of the image (a
    // colour flooding the image is not an object and has no outline to segment).
    let found: Vec<Option<ObjectRegion>> = scene
        .objects
        .iter()
        .map(|object| find_object(&colours, width, height, object.colour))
        .collect();
    let floods = |region: &ObjectRegion| region.area * 2 > width * height;
    let flooded = found
        .iter()
        .flatten()
        .filter(|region| floods(region))
        .count();
    let regions: Vec<Option<Vec<bool>>> = found
        .into_iter()
        .map(|region| region.filter(|region| !floods(region)).map(|r| r.mask))
        .collect();
    let mask_of = |ids: &[usize]| result.mask(ids, &MaskSettings::default()).to_binary();

    let mut ious = Vec::new();
    for (object_index, region) in regions.iter().enumerate() {
        let Some(region) = region else {
            continue;
        };
        let word_index = shape_word_indices.get(object_index).copied();
        let ids: Vec<usize> = result
            .segments
            .iter()
            .filter(|segment| segment.word_index.is_some() && segment.word_index == word_index)
            .map(|segment| segment.id)
            .collect();
        ious.push(iou(&mask_of(&ids), region));
    }

    let (mut object_segments, mut object_segments_right) = (0usize, 0usize);
    let (mut background_segments, mut background_segments_right) = (0usize, 0usize);
    // Per object, the segments lying mostly on it (what a perfect labelling would select).
    let mut segments_on_object: Vec<Vec<usize>> = vec![Vec::new(); regions.len()];
    for segment in &result.segments {
        if segment.pixel_count == 0 {
            continue;
        }
        let mut on_object = vec![0usize; regions.len()];
        for (pixel, _) in result
            .image
            .labels
            .iter()
            .enumerate()
            .filter(|&(_, &label)| label == segment.id)
        {
            for (count, region) in on_object.iter_mut().zip(&regions) {
                if region.as_ref().is_some_and(|mask| mask[pixel]) {
                    *count += 1;
                }
            }
        }
        match on_object
            .iter()
            .position(|&count| count * 2 > segment.pixel_count)
        {
            Some(object_index) => {
                segments_on_object[object_index].push(segment.id);
                object_segments += 1;
                let expected = shape_word_indices.get(object_index).copied();
                if expected.is_some() && segment.word_index == expected {
                    object_segments_right += 1;
                }
            }
            None => {
                background_segments += 1;
                let carries_shape = segment
                    .word_index
                    .is_some_and(|index| shape_word_indices.contains(&index));
                if !carries_shape {
                    background_segments_right += 1;
                }
            }
        }
    }
    let oracle_ious: Vec<f32> = regions
        .iter()
        .zip(&segments_on_object)
        .filter_map(|(region, ids)| Some(iou(&mask_of(ids), region.as_ref()?)))
        .collect();

    SceneMeasurement {
        seed: 0,
        caption: scene.caption.clone(),
        method: result.method,
        label_choice: LabelChoice::default(),
        objects_drawn: regions.iter().filter(|region| region.is_some()).count(),
        objects_flooded: flooded,
        objects: scene.objects.len(),
        ious,
        oracle_ious,
        object_segments,
        object_segments_right,
        background_segments,
        background_segments_right,
        segments: result.segments.len(),
        generation_secs: 0.0,
        segment_secs: 0.0,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(sum, count), value| {
        (sum + value, count + 1)
    });
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

fn summarise(
    (method, label_choice): (SegmentMethod, LabelChoice),
    scenes: &[&SceneMeasurement],
) -> EvalSummary {
    let sum =
        |value: fn(&SceneMeasurement) -> usize| scenes.iter().map(|m| value(m)).sum::<usize>();
    let mut segment_secs: Vec<f64> = scenes.iter().map(|m| m.segment_secs).collect();
    let mut generation_secs: Vec<f64> = scenes.iter().map(|m| m.generation_secs).collect();
    EvalSummary {
        method,
        label_choice,
        scenes: scenes.len(),
        objects: sum(|m| m.objects),
        objects_drawn: sum(|m| m.objects_drawn),
        objects_flooded: sum(|m| m.objects_flooded),
        mean_iou: mean(
            scenes
                .iter()
                .flat_map(|m| m.ious.iter().map(|&v| f64::from(v))),
        ),
        oracle_mean_iou: mean(
            scenes
                .iter()
                .flat_map(|m| m.oracle_ious.iter().map(|&v| f64::from(v))),
        ),
        label_accuracy: ratio(sum(|m| m.object_segments_right), sum(|m| m.object_segments)),
        object_segments: sum(|m| m.object_segments),
        background_label_accuracy: ratio(
            sum(|m| m.background_segments_right),
            sum(|m| m.background_segments),
        ),
        background_segments: sum(|m| m.background_segments),
        mean_segments: mean(scenes.iter().map(|m| m.segments as f64)),
        median_segment_ms: median(&mut segment_secs) * 1e3,
        mean_segment_ms: mean(segment_secs.iter().copied()) * 1e3,
        median_generation_secs: median(&mut generation_secs),
    }
}

fn print_summary(summary: &EvalSummary) {
    println!(
        "{} ({} labels): {} scenes, {}/{} objects drawn ({} more flooded the image)\n  \
         mIoU of labelled object masks vs colour regions: {:.3} \
         (segments chosen by overlap instead of label: {:.3})\n  \
         label accuracy (segments over an object get its shape word): {:.1}% of {}\n  \
         segments off the objects without a shape word: {:.1}% of {}\n  \
         segments per scene {:.1}; time to segment: median {:.0} ms, mean {:.0} ms; \
         generation: median {:.1} s",
        summary.method,
        summary.label_choice,
        summary.scenes,
        summary.objects_drawn,
        summary.objects,
        summary.objects_flooded,
        summary.mean_iou,
        summary.oracle_mean_iou,
        summary.label_accuracy * 100.0,
        summary.object_segments,
        summary.background_label_accuracy * 100.0,
        summary.background_segments,
        summary.mean_segments,
        summary.median_segment_ms,
        summary.mean_segment_ms,
        summary.median_generation_secs
    );
}

/// Run `attend segment-eval`.
pub fn run(args: &SegmentEvalArgs) -> anyhow::Result<()> {
    args.segmentation.check()?;
    check_guidance(args.guidance)?;
    if let Some(path) = &args.json_out {
        check_output_file("--json-out", path)?;
    }
    let mut images_out = args
        .images_out
        .as_deref()
        .map(|dir| OutDir::check("--images-out", dir))
        .transpose()?;
    let model = load_model(&args.model)?;
    let (width, height) = model.default_size_px();
    args.segmentation.check_for_model(&model, width, height)?;
    let images_dir = match &mut images_out {
        Some(dir) => Some(dir.create()?.to_path_buf()),
        None => None,
    };
    // (method, label choice) pairs, measured on the same images.
    let variants: Vec<(SegmentMethod, LabelChoice)> = if args.single_method {
        vec![(args.segmentation.method, args.segmentation.label_choice)]
    } else {
        SegmentMethod::ALL
            .into_iter()
            .flat_map(|method| LabelChoice::ALL.map(|choice| (method, choice)))
            .collect()
    };
    let scene_options = SceneOptions::default();
    let mut measurements = Vec::new();
    for index in 0..args.count {
        let seed = args.start + index;
        let scene = generate_scene(seed, &scene_options);
        let started = Instant::now();
        let generated =
            generate_with_attention(&model, &scene.caption, seed, args.steps, args.guidance)?;
        let generation_secs = started.elapsed().as_secs_f64();
        let words = label_words(
            &generated.output.prompt_tokens.words,
            args.segmentation.words.as_deref(),
        )?;
        let image = &generated.output.image;
        let mut lines = Vec::new();
        for &(method, label_choice) in &variants {
            let arguments = SegmentationArgs {
                method,
                label_choice,
                ..args.segmentation.clone()
            };
            let started = Instant::now();
            let (result, _) = segment_generated(&generated, &words, &arguments)?;
            let segment_secs = started.elapsed().as_secs_f64();
            let measurement = SceneMeasurement {
                seed,
                label_choice,
                generation_secs,
                segment_secs,
                ..measure_scene(&scene, image, &words, &result)
            };
            let listed = |values: &[f32]| {
                values
                    .iter()
                    .map(|value| format!("{value:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            lines.push(format!(
                "  {method} ({label_choice}): {} segments, IoU [{}] (by overlap [{}]), object segments {}/{} right, \
                 others {}/{} without a shape word, {:.0} ms",
                measurement.segments,
                listed(&measurement.ious),
                listed(&measurement.oracle_ious),
                measurement.object_segments_right,
                measurement.object_segments,
                measurement.background_segments_right,
                measurement.background_segments,
                segment_secs * 1e3
            ));
            if let Some(dir) = &images_dir {
                write_png_rgb(
                    &dir.join(format!("{seed:04}_{method}_{label_choice}.png")),
                    image.width,
                    image.height,
                    &overlay_segments(&image.pixels, &result),
                    Some(&scene.caption),
                )?;
            }
            measurements.push(measurement);
        }
        eprintln!(
            "[{}/{}] seed {seed} \"{}\" ({generation_secs:.1} s)\n{}",
            index + 1,
            args.count,
            scene.caption,
            lines.join("\n")
        );
    }

    let summaries: Vec<EvalSummary> = variants
        .iter()
        .map(|&(method, label_choice)| {
            let scenes: Vec<&SceneMeasurement> = measurements
                .iter()
                .filter(|measurement| {
                    measurement.method == method && measurement.label_choice == label_choice
                })
                .collect();
            summarise((method, label_choice), &scenes)
        })
        .collect();
    println!(
        "segment-eval: scenes {}..{}, {} steps",
        args.start,
        args.start + args.count,
        args.steps
    );
    summaries.iter().for_each(print_summary);
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "summaries": summaries,
            "scenes": measurements,
        }))?;
        attend::analysis::export::write_atomically(path, |writer| {
            std::io::Write::write_all(writer, text.as_bytes())
        })?;
    }
    if let Some(dir) = images_out {
        dir.keep();
    }
    Ok(())
}
